"""The AVX2 translation unit must not define any symbol another translation unit may define.

kernels_avx2.cpp is compiled for AVX2 (a target pragma over the whole file, vec_avx2.h
included). An inline function from a shared header (c10, ATen, the C++ library)
that the compiler emits there as a weak symbol is AVX2 code that the linker may keep for
the whole library (one definition rule): the portable path would then run AVX2
instructions, and code compiled for two targets would be mixed. Only symbols that exist
in this file alone are allowed: code on the vector types (savae_fast::cpu::Vec<T>, used by
no other file), the table accessors and local symbols.
usage: check_avx2_symbols.py <object files of the extension...>
"""

import re
import subprocess
import sys

# (ctest passes CMake's list of object files as one ';'-separated argument)
objects = [o for arg in sys.argv[1:] for o in arg.split(";") if o.endswith("kernels_avx2.cpp.o")]
if len(objects) != 1:
    sys.exit(f"expected one kernels_avx2.cpp.o among {sys.argv[1:]}")
out = subprocess.run(["nm", "-C", "--defined-only", objects[0]], capture_output=True, text=True, check=True).stdout
allowed = re.compile(r"savae_fast::cpu::Vec<|^DW\.ref\.|savae_fast::cpu::avx2_table_(float|double)\(\)|^_GLOBAL__sub_I_")
shared = []
for line in out.splitlines():
    parts = line.split(maxsplit=2)
    if len(parts) != 3:
        continue
    _, kind, name = parts
    if kind in "TWVuDBRi" and not allowed.search(name):  # global or weak (uppercase, 'u', 'i')
        shared.append(f"{kind} {name}")
print(f"{objects[0]}: {len(out.splitlines())} defined symbols")
if shared:
    sys.exit("symbols of shared headers compiled for AVX2 (one-definition-rule hazard):\n" + "\n".join(shared))
print("no symbol shared with other translation units")
