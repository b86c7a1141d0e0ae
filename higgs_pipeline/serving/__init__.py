"""Speaking with a model: adapter resolution, merging into the base, generation through boson's serve engine,
sentences and dialogues. Used by the evaluation, the serving assets and the commands alike."""
