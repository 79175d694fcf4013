"""Judges of generated pictures: the `shapes` domain's compositional judge (`shapes`) and the judged accuracy of a
source of images over the benchmark's prompt sets (`accuracy`).

Training logs a running score with them, evaluation reports them, probes rank recipes by them; so they sit below
train and eval, and build nothing themselves (an images function is handed in).
"""
