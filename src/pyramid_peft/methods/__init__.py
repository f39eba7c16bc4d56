"""The methods. Importing this package imports every method package, and each registers itself (``spec.py``).

Adding a method: its own folder (config, layer, tuner, and ``register_method(MethodSpec(...))`` in its
``__init__``) plus one import line here.
"""

from . import ept, hydralora, mixlora, moelora, more, multilora, tucka  # noqa: F401  (each registers itself)
