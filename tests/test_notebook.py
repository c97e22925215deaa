"""Issue 47: the script pasted whole into a notebook cell runs with its constants as edited; %run passes its own
arguments. Both execute the file's source in this process, as a kernel does."""
import builtins
import os
import re
import sys

from conftest import DATA_DIR, SCRIPT


def _edited_source(out):
    """The script as a user edits its constants for a tiny run: one epoch of 3 small batches, on the CPU."""
    source = open(SCRIPT, encoding="utf-8").read()
    for name, value in (("EPOCHS", 1), ("MAX_BATCHES", 3), ("BATCH_SIZE", 16), ("NGF", 16), ("NDF", 16),
                        ("DEVICE", "cpu"), ("DATA_DIR", DATA_DIR), ("OUTPUT_DIR", out)):
        source, n = re.subn(rf"^{name} = .*?(  #)", lambda m: f"{name} = {value!r}{m[1]}", source, count=1, flags=re.M)
        assert n == 1, name
    return source


def _run_cell(source, namespace, argv, monkeypatch, capsys):
    """exec, as a kernel runs a cell: __name__ is "__main__", get_ipython is defined, sys.argv is as given.
    Any SystemExit fails the test (a notebook shows it as an error)."""
    monkeypatch.setattr(sys, "argv", argv)
    namespace = {"__name__": "__main__", "__builtins__": builtins, "get_ipython": lambda: None, **namespace}
    exec(compile(source, namespace.get("__file__", "<cell>"), "exec"), namespace)
    return capsys.readouterr().out


def test_pasted_into_a_cell_it_trains_with_the_constants_as_edited(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "cell_run")
    monkeypatch.chdir(tmp_path)  # a notebook's working folder; no __file__ anywhere
    kernel = ["/usr/lib/python3/site-packages/ipykernel_launcher.py", "-f", "/root/.local/kernel-1234.json"]
    printed = _run_cell(_edited_source(out), {}, kernel, monkeypatch, capsys)
    assert "Epoch [1/1]" in printed and "Done in" in printed, printed
    assert os.path.getsize(os.path.join(out, "samples_epoch_001.png")) > 0
    assert os.path.isfile(os.path.join(out, "G_model.ckpt"))


def test_run_magic_passes_the_users_arguments(tmp_path, monkeypatch, capsys):
    """%run dcgan_mnist.py --epochs=2: __file__ is the script, sys.argv the user's (the kernel's is set aside)."""
    out = str(tmp_path / "run_magic")
    script = tmp_path / "dcgan_mnist.py"
    script.write_text(_edited_source(out), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    printed = _run_cell(script.read_text(encoding="utf-8"), {"__file__": str(script)},
                        [str(script), "--epochs=2", "--seed=1"], monkeypatch, capsys)
    assert "Epoch [2/2]" in printed and "Done in" in printed, printed
    assert os.path.isfile(os.path.join(out, "samples_epoch_002.png"))
    import torch
    assert torch.load(os.path.join(out, "last.ckpt"), weights_only=True)["config"]["seed"] == 1


def test_a_kernels_argv_is_not_a_command_line():
    from conftest import dm
    assert dm.kernel_argv(["/x/ipykernel_launcher.py", "-f", "/x/kernel-1.json"])
    assert dm.kernel_argv(["/usr/local/lib/python3/dist-packages/colab_kernel_launcher.py", "-f", "/r/k.json"])
    assert dm.kernel_argv(["/x/other_launcher.py", "-f", "/x/kernel-v2-123.json"])
    assert not dm.kernel_argv(["dcgan_mnist.py", "--epochs=1"]) and not dm.kernel_argv(["dcgan_mnist.py"])
    assert dm.resume_command(["/x/ipykernel_launcher.py", "-f", "/x/k.json"]) == "python dcgan_mnist.py --resume=True"
