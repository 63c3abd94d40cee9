"""dit4dit: a Video-Action Model — a video DiT's hidden states at a fixed flow time condition an
action DiT that generates robot action chunks by flow matching; both are trained jointly."""

__version__ = "0.1.0"
