"""One module per runtime behind one Runner interface; ``registry`` names every backend and
is the only place that constructs a runner."""
