"""`python -m tsparse`: how tsparse was built and whether a GPU is usable now."""

from __future__ import annotations

import sys

import torch

import tsparse


def main() -> int:
    info = tsparse.build_info()
    width = max(len(k) for k in info) + 2
    print("tsparse build")
    for key, value in info.items():
        print(f"  {key:<{width}}{value}")
    gpu = torch.cuda.is_available()
    print("runtime")
    print(f"  {'gpu_usable':<{width}}{gpu}")
    if gpu:
        props = torch.cuda.get_device_properties(0)
        print(f"  {'device':<{width}}{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)")
    print(f"  {'cuda_kernels_usable':<{width}}{tsparse.cuda_kernels_available()}")
    if info["cuda_kernels"] and gpu:
        major, minor = torch.cuda.get_device_capability(0)
        archs = str(info["cuda_arch_list"]).replace(" ", ";").split(";")
        have = {a.replace(".", "").rstrip("a").replace("+PTX", "") for a in archs if a}
        if f"{major}{minor}" not in have:
            print(f"  warning: built for {info['cuda_arch_list']} but the device is sm_{major}{minor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
