#!/usr/bin/env python3
"""Add Opacus's epsilon to every vector of tests/data/rdp_vectors.json.

A second independent implementation for the Rust RDP accountant: Opacus's
analysis module (`opacus/accountants/analysis/rdp.py`), which keeps the signs
of the fractional-order series (Mironov, Talwar, Zhang 2019). Opacus itself
imports torch; the analysis module needs only numpy and scipy, so the package
is installed without its dependencies and the one file is loaded by path:

    python3 -m venv venv
    venv/bin/pip install dp-accounting mpmath numpy scipy
    venv/bin/pip install --no-deps opacus
    venv/bin/python scripts/rdp_vectors_opacus.py tests/data/rdp_vectors.json

Each vector gets `epsilon_opacus`: `compute_rdp(q, sigma, steps, orders)` then
`get_privacy_spent(orders, rdp, delta)` over the file's order grid.
"""

import importlib.metadata
import importlib.util
import json
import os
import sys


def load_analysis():
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("opacus is not installed (pip install --no-deps opacus)")
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "accountants", "analysis", "rdp.py")
    module_spec = importlib.util.spec_from_file_location("opacus_rdp_analysis", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def main():
    path = sys.argv[1]
    with open(path) as f:
        data = json.load(f)
    rdp = load_analysis()
    orders = data["orders"]
    for v in data["vectors"]:
        r = rdp.compute_rdp(
            q=v["q"], noise_multiplier=v["sigma"], steps=v["steps"], orders=orders
        )
        eps, _ = rdp.get_privacy_spent(orders=orders, rdp=r, delta=v["delta"])
        v["epsilon_opacus"] = float(eps)
    data["generator"]["opacus"] = {
        "package": "opacus",
        "version": importlib.metadata.version("opacus"),
        "function": "opacus.accountants.analysis.rdp.compute_rdp + get_privacy_spent "
        "(the module loaded by file path, without torch)",
        "script": "scripts/rdp_vectors_opacus.py",
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
