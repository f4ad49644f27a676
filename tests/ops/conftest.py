from tests.ops._util import rng  # noqa: F401  (fixture)
