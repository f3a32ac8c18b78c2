"""What every generated file shares: the pinned install, the resolved config, shell quoting."""

import shlex
from importlib import metadata

import yaml
from flaxpod.sharding.targets.pod import Job
from flaxpod.train.config import to_dict

CONFIG_HEREDOC = "FLAXPOD_CONFIG"
ENTRY_POINTS = ("pretrain", "finetune")


def pinned_packages(kind: str, flaxpod_spec: str | None) -> list[str]:
    """pip requirements for a host: jax at this machine's version (with the TPU or CUDA wheels) and
    flaxpod at this machine's version, unless ``flaxpod_spec`` names another (a wheel URL, git+https://...@SHA)."""
    jax_version = metadata.version("jax")
    jax_req = f"jax[tpu]=={jax_version}" if kind == "tpu" else f"jax[cuda12]=={jax_version}"
    return [jax_req, flaxpod_spec or f"flaxpod=={metadata.version('flaxpod')}"]


def resolved_config_yaml(job: Job) -> str:
    """The run's full config (every key, defaults included), with the paths every host uses."""
    return yaml.safe_dump(to_dict(job.cfg), sort_keys=False)


def heredoc(path: str, text: str) -> str:
    """Shell lines writing ``text`` to ``path`` verbatim (quoted delimiter: no expansion)."""
    if CONFIG_HEREDOC in text:
        raise ValueError(f"the config contains the here-document delimiter {CONFIG_HEREDOC}")
    return f"cat > {path} <<'{CONFIG_HEREDOC}'\n{text.rstrip()}\n{CONFIG_HEREDOC}"


def shell_join(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)
