from bpfprof.symbolizer.frames import FrameKind
from bpfprof.symbolizer.kernel import KernelSymbols

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81001000 t do_one_thing
ffffffff81002000 D some_data
ffffffff81002ff0 t __pfx_ksys_read
ffffffff81003000 T ksys_read
ffffffffc0000000 t ext4_readpage\t[ext4]
"""


def test_names_text_symbols_by_nearest_start(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    kernel = KernelSymbols(str(path))
    assert kernel.get_name(0xFFFFFFFF81001234) == "do_one_thing"
    assert kernel.get_name(0xFFFFFFFF81002500) == "do_one_thing"  # data symbols are not functions
    assert kernel.get_name(0xFFFFFFFF81002FF8) == "do_one_thing"  # nor the padding before a function
    assert kernel.get_name(0xFFFFFFFF81003010) == "ksys_read"
    assert kernel.get_name(0xFFFFFFFFC0000010) == "ext4_readpage"
    frame = kernel.get_frame(0xFFFFFFFF81003010)
    assert frame.kind is FrameKind.KERNEL and frame.module.path == "[kernel.kallsyms]"


def test_symbols_out_of_address_order_are_sorted(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text("".join(reversed(KALLSYMS.splitlines(keepends=True))))
    kernel = KernelSymbols(str(path))
    assert kernel.get_name(0xFFFFFFFF81001234) == "do_one_thing"
    assert kernel.get_name(0xFFFFFFFF81003010) == "ksys_read"
    assert kernel.get_name(0xFFFFFFFFC0000010) == "ext4_readpage"
    assert kernel.get_name(0xFFFFFFFF80000000) is None


def test_hidden_addresses_still_name_the_module(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text("0000000000000000 T _stext\n0000000000000000 T ksys_read\n")
    assert KernelSymbols(str(path)).get_frame(0xFFFFFFFF81003010).name == "[kernel.kallsyms+0xffffffff81003010]"
