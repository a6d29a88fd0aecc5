"""Files that torch, transformers or Jinja refuse to load end a run in one `error:` line naming the file (or folder)
and the fix, exit status 2, with nothing run from the file and nothing lost: malicious pickles (a checkpoint's
optimizer, scheduler or RNG state, an LM's pytorch_model.bin), a chat template escaping Jinja's sandbox, a model
folder with custom code and no --trust_remote_code."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llava.data.types import ConfigurationError
from llava.train import main
from llava.training.checkpoints import is_complete
from tests.helpers.outputs import REPO
from tests.helpers.runs import CHECKPOINTED

ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


class RunsCode:
    """Pickled, it makes `torch.load` run `os.system` (weights_only refuses it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def flags(parts, out, lm=None, *extra):
    return ["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", lm or parts["lm"],
            "--data_path", parts["data"], "--image_folder", parts["images"], "--freeze_language_model", "True",
            "--output_dir", str(out), *CHECKPOINTED, *extra]


@pytest.fixture(scope="module")
def checkpointed(parts, tmp_path_factory):
    """An output_dir holding checkpoint-2 (of 4 steps to train)."""
    out = tmp_path_factory.mktemp("refusals") / "out"
    main(flags(parts, out, None, "--max_steps", "2"))
    assert is_complete(str(out / "checkpoint-2"))
    return out


def copy_lm(parts, tmp_path):
    lm = tmp_path / "lm"
    shutil.copytree(parts["lm"], lm)
    return lm


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_malicious_pickle_in_the_resumed_checkpoint_is_named(parts, checkpointed, tmp_path, name):
    out = tmp_path / "out"
    shutil.copytree(checkpointed, out)
    bad = out / "checkpoint-2" / name
    marker = tmp_path / "code_ran"
    torch.save({"state": RunsCode(marker)}, bad)
    before = sorted(os.listdir(out / "checkpoint-2"))
    with pytest.raises(ConfigurationError, match=rf"^{bad}: refused by torch.load\(weights_only=True\): the pickle "
                                                 r"imports posix.system, which loading would run .* delete that "
                                                 "checkpoint-N to resume from an earlier one"):
        main(flags(parts, out, None, "--max_steps", "4"))
    assert not marker.exists()
    assert sorted(os.listdir(out / "checkpoint-2")) == before and is_complete(str(out / "checkpoint-2"))


def test_a_malicious_lm_weights_pickle_ends_the_command_in_one_line(parts, tmp_path):
    """Through the command line: one `error:` line, exit status 2, no traceback, no lock left."""
    lm = copy_lm(parts, tmp_path)
    os.remove(lm / "model.safetensors")
    marker = tmp_path / "code_ran"
    torch.save({"lm_head.weight": RunsCode(marker)}, lm / "pytorch_model.bin")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "train_llava.py", *flags(parts, out, str(lm), "--max_steps", "2")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and errors == [
        f"error: {lm / 'pytorch_model.bin'}: refused by torch.load(weights_only=True): the pickle imports "
        "posix.system, which loading would run (a malicious or corrupted file). Replace it with a file from a "
        "source you trust (a model's model.safetensors, or a checkpoint-N this project wrote), or delete that "
        "checkpoint-N to resume from an earlier one."], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not marker.exists()
    assert os.listdir(out) == ["data_mixture.json"]  # no lock, no checkpoint


@pytest.mark.parametrize("where", ["lm_folder", "chat_template_flag"])
def test_a_chat_template_escaping_the_sandbox_is_named(parts, tmp_path, where):
    lm = copy_lm(parts, tmp_path)
    template = (lm / "chat_template.jinja").read_text()
    if where == "lm_folder":
        (lm / "chat_template.jinja").write_text(ESCAPE + template)
        extra = []
    else:
        (tmp_path / "escape.jinja").write_text(ESCAPE + template)
        extra = ["--chat_template", str(tmp_path / "escape.jinja")]
    with pytest.raises(ConfigurationError, match=rf"^The chat template of {lm} \(--chat_template when given, else its "
                                                 r"chat_template.jinja or tokenizer_config.json\) does what Jinja's "
                                                 r"sandbox forbids: access to attribute '__class__' of 'str' object "
                                                 "is unsafe"):
        main(flags(parts, tmp_path / "out", str(lm), "--max_steps", "1", *extra))


def test_custom_code_without_trust_remote_code_is_named(parts, tmp_path):
    lm = copy_lm(parts, tmp_path)
    config = json.loads((lm / "config.json").read_text())
    config.update(model_type="homemade", auto_map={"AutoConfig": "configuration.HomemadeConfig",
                                                   "AutoModelForCausalLM": "modeling.HomemadeModel"})
    (lm / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code_ran"
    (lm / "configuration.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ConfigurationError, match=rf"^{lm} holds custom code .* pass --trust_remote_code True to run "
                                                 "it; or use a model that transformers supports without it"):
        main(flags(parts, tmp_path / "out", str(lm), "--max_steps", "1"))
    assert not marker.exists()
