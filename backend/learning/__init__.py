"""Learning from corrected masks: annotations -> visual prototypes per project."""
