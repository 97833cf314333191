"""paws: PAWS semi-supervised learning (Assran et al., 2021) as a library and a command.

The method lives in :mod:`paws.losses`; :mod:`paws.train` pre-trains, :mod:`paws.evaluate`
classifies by soft nearest neighbours, and the ``paws`` command wraps them.
"""

__version__ = "0.1.0"
