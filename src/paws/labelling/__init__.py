"""Which images to label next: the strategies (pure functions of embeddings), ``paws
suggest`` and its contact sheet."""
