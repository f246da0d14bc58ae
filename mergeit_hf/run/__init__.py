"""The run itself: the pipeline that chains the stages, and the ``mergeit`` command line."""
