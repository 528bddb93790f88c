"""The detector card: labelled ground-truth cases and each detector's precision and recall."""
