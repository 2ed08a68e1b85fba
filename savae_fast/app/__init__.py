"""The application on top of the kernel library: data, training, evaluation, the
demo and the ``savae-fast`` command line. The library (``savae_fast.ops``,
``savae_fast.refine``, ``savae_fast.models``) does not import it."""
