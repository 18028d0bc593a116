"""The reconciler worker: turns labelled predictions into new model versions, one leader at a time."""
