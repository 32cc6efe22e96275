"""features.csv, the table every step after training shares: columns, ranking, file round trip."""

import numpy as np
import pytest

from stagediff.demo import print_summary
from stagediff.errors import StagediffError
from stagediff.features import cos_column, rank_by_score, rank_scores, read_features, top_ranked, write_features


def test_rank_by_score_orders_eligible_features_and_keeps_ties_in_feature_order():
    score = np.array([0.5, 2.0, np.nan, 2.0, 9.0, 1.0])
    eligible = np.array([True, True, False, True, False, True])  # feature 4 scores best but is not eligible
    rank = rank_by_score(score, eligible)
    assert rank.tolist() == [4, 1, 0, 2, 0, 3]  # 1 and 3 tie: the lower id first
    assert top_ranked(rank, 3).tolist() == [1, 3, 5]
    s, r = rank_scores(score, dead=np.array([False, True, False, False, False, False]))
    assert np.isnan(s[[1, 2]]).all() and r.tolist() == [4, 0, 0, 2, 1, 3]


def test_columns_round_trip_with_unranked_blank(tmp_path):
    cols = {"feature": np.arange(4), "dead": np.array([False, True, False, False]),
            cos_column("dec", "D", "F_via_D"): np.array([0.25, np.nan, 0.123456789, 1.0]),
            "rank": np.array([2, 0, 1, 3])}
    path = tmp_path / "diff" / "features.csv"
    write_features(path, cols)
    assert path.read_text().splitlines()[0] == "feature,dead,dec_cos_D_FD,rank"
    assert path.read_text().splitlines()[2] == "1,True,nan,"  # unranked: an empty rank
    back = read_features(path)
    assert back["rank"].tolist() == [2, 0, 1, 3] and back["dead"].dtype == bool
    assert back["dec_cos_D_FD"][2] == pytest.approx(0.12345679) and np.isnan(back["dec_cos_D_FD"][1])
    assert cos_column("enc", "S", "F_via_M") == "enc_cos_S_FM" and cos_column("dec", "A", "B") == "dec_cos_A_B"
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(StagediffError, match="no `feature` column"):
        read_features(tmp_path / "bad.csv")


def test_demo_summary_lists_the_top_ranked_features_in_rank_order(tmp_path, capsys):
    n = 30
    rank = np.zeros(n, dtype=np.int64)
    rank[[17, 4, 22]] = [1, 2, 3]
    write_features(tmp_path / "diff" / "features.csv", {"feature": np.arange(n), "dec_cos_D_FD": np.linspace(0, 1, n),
                                                        "dec_cos_M_FM": np.full(n, 0.5), "rank": rank})
    print_summary(tmp_path)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "feature" in ln]
    assert [int(ln.split("feature")[1].split()[0]) for ln in lines] == [17, 4, 22]
    assert f"cos(D,F)={np.linspace(0, 1, n)[17]:.3f}" in lines[0]
