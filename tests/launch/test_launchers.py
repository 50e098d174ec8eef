"""The launchers' dry runs, printed exactly; their shell quoting, run by a real shell with stub
commands (python3, srun, scontrol, gcloud, sbatch); the local launcher's process management."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from launch import common, local, slurm, tpu_vm

# Overrides a shell would break: spaces, both quotes, $, a backslash, a glob.
TRICKY = ["--config.data.path=gs://b/data/k 400", "--config.name=it's \"q\" $HOME \\n *"]
ROOT = shlex.quote(common.REPO_ROOT)


def _dry_run(capsys, module, argv):
  i = argv.index("--") if "--" in argv else len(argv)
  assert module.main(argv[:i] + ["--dry-run"] + argv[i:]) == 0
  captured = capsys.readouterr()
  return captured.out.splitlines()


def _usage_error(capsys, module, argv):
  with pytest.raises(SystemExit) as e:
    module.main(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


def _stub(directory, name, body):
  """An executable `name` in `directory`: a Python script run by this interpreter."""
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write(f"#!{sys.executable}\n" + textwrap.dedent(body))
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


# A stub that appends its name, argv and a few env variables, as JSON, to $STUB_LOG, prints
# $STUB_PRINT (if set) and exits with $STUB_EXIT (default 0).
_RECORDER = """
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps({"name": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                      "env": {k: os.environ.get(k) for k in
                              ("TF_CPP_MIN_LOG_LEVEL", "JAX_LOCAL_DEVICE_IDS", "MY_VAR")}}) + "\\n")
if os.environ.get("STUB_PRINT"):
  print(os.environ["STUB_PRINT"])
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
"""


def _records(log):
  if not os.path.exists(log):
    return []
  with open(log) as f:
    return [json.loads(line) for line in f]


@pytest.fixture
def stubs(tmp_path, monkeypatch):
  """A bin directory first on PATH; stubs written with `stubs(name)` record their calls."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = str(tmp_path / "calls.jsonl")
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("STUB_LOG", log)

  def make(name, body=_RECORDER):
    _stub(str(bin_dir), name, body)
  make.log = log
  make.records = lambda: _records(log)
  return make


# ------------------------------------------------------------------------------------------------
# common


def test_format_command_quotes_values_not_assignments():
  line = common.format_command(["python", "-m", "x", "--a=b c"], {"XLA_FLAGS": "--p=1 --q=2"})
  assert line == "XLA_FLAGS='--p=1 --q=2' python -m x '--a=b c'"
  assert shlex.split(line) == ["XLA_FLAGS=--p=1 --q=2", "python", "-m", "x", "--a=b c"]


def test_main_command_and_override_checks():
  assert common.main_command("configs/vit.py:demo", "/w", mode="train", overrides=["--config.a=1"],
                             python="py", flags=["--process_id=0"]) == [
      "py", "-m", "msca_jax.main", "--config=configs/vit.py:demo", "--workdir=/w", "--mode=train",
      "--process_id=0", "--config.a=1"]
  with pytest.raises(common.LaunchError, match="must be flags"):
    common.check_overrides(["positional"])
  with pytest.raises(common.LaunchError, match="--num_processes is set by the launcher"):
    common.check_overrides(["--num_processes=4"])
  with pytest.raises(common.LaunchError, match="NAME=VALUE"):
    common.parse_env(["1BAD=x"])
  assert common.parse_env(["A=x=y"], {"B": "1"}) == {"B": "1", "A": "x=y"}


# ------------------------------------------------------------------------------------------------
# tpu_vm

_TPU = ["--project=my-proj", "--zone=us-west4-a", "--name=msca-v5e"]
_TPU_RUN = ["--config=configs/msca_kv.py", "--workdir=gs://bkt/runs/msca_kv"]
_PIP = ('python3 -m pip install --quiet --upgrade pip && python3 -m pip install --quiet -e . && '
        'python3 -m pip install --quiet "jax[tpu]==$(python3 -c "import jax; '
        'print(jax.__version__)")"')


def test_tpu_launch_dry_run(capsys):
  lines = _dry_run(capsys, tpu_vm, ["launch"] + _TPU + [
      "--accelerator_type=v5litepod-16", "--spot", "--tarball=/tmp/msca.tar.gz"] + _TPU_RUN + [
      "--", "--config.data.path=gs://bkt/data/k400_dmvr"])
  where = "--zone=us-west4-a --project=my-proj"
  ssh = f"gcloud compute tpus tpu-vm ssh msca-v5e {where} --worker=all"
  assert lines == [
      f"gcloud compute tpus tpu-vm create msca-v5e {where} --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite --spot",
      f"git -C {ROOT} archive --format=tar.gz --output=/tmp/msca.tar.gz HEAD",
      f"gcloud compute tpus tpu-vm scp /tmp/msca.tar.gz msca-v5e:msca_jax.tar.gz {where} "
      "--worker=all",
      f"{ssh} '--command=rm -rf msca_jax && mkdir -p msca_jax && tar -xzf msca_jax.tar.gz "
      f"-C msca_jax && cd msca_jax && {_PIP}'",
      f"{ssh} '--command=cd msca_jax && set -o pipefail && TF_CPP_MIN_LOG_LEVEL=2 python3 -m "
      "msca_jax.main --config=configs/msca_kv.py --workdir=gs://bkt/runs/msca_kv "
      "--config.data.path=gs://bkt/data/k400_dmvr 2>&1 | tee -a ~/msca_jax_train.log'",
      f"gcloud compute tpus tpu-vm delete msca-v5e {where} --quiet",
  ]


def test_tpu_queued_resource_and_git_install_dry_run(capsys):
  lines = _dry_run(capsys, tpu_vm, [
      "launch", "--zone=us-central2-b", "--name=pod", "--queued", "--accelerator_type=v4-32",
      "--runtime_version=tpu-ubuntu2204-base", "--repo=https://github.com/me/msca_jax.git",
      "--ref=v0.1", "--keep"] + _TPU_RUN + ["--mode=train", "--env=MY_VAR=1"])
  assert lines == [
      "gcloud compute tpus queued-resources create pod-qr --zone=us-central2-b --node-id=pod "
      "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base",
      "gcloud compute tpus queued-resources describe pod-qr --zone=us-central2-b "
      "'--format=value(state.state)'",
      "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all '--command=rm -rf "
      "msca_jax && git clone --quiet https://github.com/me/msca_jax.git msca_jax && cd msca_jax && "
      f"git checkout --quiet v0.1 && {_PIP}'",
      "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all '--command=cd msca_jax "
      "&& set -o pipefail && TF_CPP_MIN_LOG_LEVEL=2 MY_VAR=1 python3 -m msca_jax.main "
      "--config=configs/msca_kv.py --workdir=gs://bkt/runs/msca_kv --mode=train 2>&1 | tee -a "
      "~/msca_jax_train.log'",
  ]  # --keep: no delete
  assert _dry_run(capsys, tpu_vm, ["delete", "--zone=z", "--name=pod", "--queued"]) == [
      "gcloud compute tpus queued-resources delete pod-qr --zone=z --force --quiet"]


def test_tpu_other_subcommands_dry_run(capsys):
  ssh = "gcloud compute tpus tpu-vm ssh n --zone=z"
  assert _dry_run(capsys, tpu_vm, ["create", "--zone=z", "--name=n", "--accelerator_type=v6e-8",
                                   "--preemptible"]) == [
      "gcloud compute tpus tpu-vm create n --zone=z --accelerator-type=v6e-8 "
      "--version=v2-alpha-tpuv6e --preemptible"]
  assert _dry_run(capsys, tpu_vm, ["logs", "--zone=z", "--name=n", "--worker=3", "--lines=20"]) == [
      f"{ssh} --worker=3 '--command=tail -n 20 -F ~/msca_jax_train.log'"]
  assert _dry_run(capsys, tpu_vm, ["logs", "--zone=z", "--name=n", "--no-follow"]) == [
      f"{ssh} --worker=0 '--command=tail -n 100 ~/msca_jax_train.log'"]
  assert _dry_run(capsys, tpu_vm, ["stop", "--zone=z", "--name=n"]) == [
      f"{ssh} --worker=all '--command=pkill -TERM -f \"[m]sca_jax[.]main\" || true'"]
  assert _dry_run(capsys, tpu_vm, ["run", "--zone=z", "--name=n", "--detach"] + _TPU_RUN) == [
      f"{ssh} --worker=all '--command=cd msca_jax && (TF_CPP_MIN_LOG_LEVEL=2 nohup python3 -m "
      "msca_jax.main --config=configs/msca_kv.py --workdir=gs://bkt/runs/msca_kv >> "
      "~/msca_jax_train.log 2>&1 < /dev/null &)'"]


def _remote_command(line):
  argv = shlex.split(line)
  [command] = [a for a in argv if a.startswith("--command=")]
  return command[len("--command="):]


def test_tpu_tricky_overrides_survive_both_quoting_levels(capsys):
  [line] = _dry_run(capsys, tpu_vm, ["run", "--zone=z", "--name=n"] + _TPU_RUN + ["--"] + TRICKY)
  words = shlex.split(_remote_command(line))
  start = words.index("python3")
  assert words[start:words.index("2>&1")] == [
      "python3", "-m", "msca_jax.main", "--config=configs/msca_kv.py",
      "--workdir=gs://bkt/runs/msca_kv"] + TRICKY


def test_tpu_remote_commands_run_in_a_real_shell(capsys, stubs, tmp_path):
  """The install and run commands, executed by bash in a fake home with a stub python3."""
  home = tmp_path / "home"
  home.mkdir()
  src = tmp_path / "src"
  (src / "configs").mkdir(parents=True)
  (src / "configs" / "x.py").write_text("")
  with tarfile.open(home / "msca_jax.tar.gz", "w:gz") as tar:
    tar.add(src / "configs", arcname="configs")
  stubs("python3", _RECORDER)
  base = ["--zone=z", "--name=n"]
  [_, _, install] = _dry_run(capsys, tpu_vm, ["install"] + base)
  env = dict(os.environ, HOME=str(home), STUB_PRINT="0.10.2")
  subprocess.run(["bash", "-c", _remote_command(install)], cwd=home, env=env, check=True)
  assert (home / "msca_jax" / "configs" / "x.py").exists()
  assert [r["argv"] for r in stubs.records()] == [
      ["-m", "pip", "install", "--quiet", "--upgrade", "pip"],
      ["-m", "pip", "install", "--quiet", "-e", "."],
      ["-c", "import jax; print(jax.__version__)"],
      ["-m", "pip", "install", "--quiet", "jax[tpu]==0.10.2"]]

  os.remove(stubs.log)
  [run] = _dry_run(capsys, tpu_vm, ["run"] + base + _TPU_RUN + ["--env=MY_VAR=a b", "--"] + TRICKY)
  env = dict(os.environ, HOME=str(home), STUB_PRINT="training...", STUB_EXIT="143")
  done = subprocess.run(["bash", "-c", _remote_command(run)], cwd=home, env=env,
                        stdout=subprocess.PIPE, text=True)
  assert done.returncode == 143  # set -o pipefail: tee does not hide the trainer's status
  assert done.stdout == "training...\n"
  assert (home / "msca_jax_train.log").read_text() == "training...\n"
  [record] = stubs.records()
  assert record["argv"] == ["-m", "msca_jax.main", "--config=configs/msca_kv.py",
                            "--workdir=gs://bkt/runs/msca_kv"] + TRICKY
  assert record["env"]["TF_CPP_MIN_LOG_LEVEL"] == "2" and record["env"]["MY_VAR"] == "a b"


def test_tpu_runs_gcloud_and_polls_a_queued_resource(capsys, stubs, tmp_path, monkeypatch):
  """Without --dry-run: each command printed then run; describe polled until ACTIVE."""
  states = tmp_path / "states"
  states.write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
  monkeypatch.setenv("STATES", str(states))
  # describe prints the next state from the file
  stubs("gcloud", """
      import json, os, sys
      with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps({"name": "gcloud", "argv": sys.argv[1:], "env": {}}) + "\\n")
      if "describe" in sys.argv:
        path = os.environ["STATES"]
        lines = open(path).read().split()
        print(lines[0])
        open(path, "w").write("\\n".join(lines[1:]))
      """)
  assert tpu_vm.main(["create", "--zone=z", "--name=n", "--queued", "--accelerator_type=v4-8",
                      "--poll_seconds=0"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out == [
      "gcloud compute tpus queued-resources create n-qr --zone=z --node-id=n "
      "--accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base",
      "gcloud compute tpus queued-resources describe n-qr --zone=z '--format=value(state.state)'",
      "state: WAITING_FOR_RESOURCES", "state: PROVISIONING", "state: ACTIVE"]
  calls = [r["argv"][3] for r in stubs.records()]
  assert calls == ["create", "describe", "describe", "describe"]


def test_tpu_launch_deletes_after_a_failed_run(capsys, stubs):
  stubs("gcloud", """
      import json, os, sys
      with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps({"name": "gcloud", "argv": sys.argv[1:], "env": {}}) + "\\n")
      sys.exit(143 if "ssh" in sys.argv and "set -o pipefail" in sys.argv[-1] else 0)
      """)
  stubs("git")
  status = tpu_vm.main(["launch", "--zone=z", "--name=n", "--accelerator_type=v4-8"] + _TPU_RUN)
  assert status == 143
  calls = [[r["name"]] + r["argv"][:4] for r in stubs.records()]
  assert calls == [["git", "-C", common.REPO_ROOT, "status", "--porcelain"],  # uncommitted?
                   ["gcloud", "compute", "tpus", "tpu-vm", "create"],
                   ["git", "-C", common.REPO_ROOT, "archive", "--format=tar.gz"],
                   ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
                   ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],   # install
                   ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],   # run: fails with 143
                   ["gcloud", "compute", "tpus", "tpu-vm", "delete"]]
  assert "failed (143)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["create", "--zone=z", "--name=n", "--accelerator_type=tpu-v4"],
     "--accelerator_type expects GENERATION-SIZE such as v4-32"),
    (["create", "--zone=z", "--name=n", "--accelerator_type=v9x-8"],
     "no default --runtime_version for v9x"),
    (["create", "--zone=z", "--name=n", "--accelerator_type=v4-8", "--queued", "--preemptible"],
     "queued resources take --spot, not --preemptible"),
    (["create", "--zone=z", "--name=n", "--accelerator_type=v4-8", "--spot", "--preemptible"],
     "not allowed with argument"),
    (["create", "--zone=z", "--name=My_TPU", "--accelerator_type=v4-8"],
     "--name must be lowercase letters, digits and hyphens"),
    (["run", "--zone=z", "--name=n", "--config=c", "--workdir=/tmp/w"],
     "--workdir must be a gs:// path"),
    (["delete", "--zone=z", "--name=n", "--", "--config.a=1"],
     "only `run` and `launch` take them, not `delete`"),
    (["launch", "--zone=z", "--name=n", "--accelerator_type=v4-8", "--detach"] + _TPU_RUN,
     "add --keep"),
    (["create", "--name=n", "--accelerator_type=v4-8"], "the following arguments are required: --zone"),
])
def test_tpu_bad_flags(capsys, argv, message):
  assert message in _usage_error(capsys, tpu_vm, argv[:1] + ["--dry-run"] + argv[1:])


# ------------------------------------------------------------------------------------------------
# slurm

_SLURM = ["--nodes=2", "--gpus_per_node=8", "--partition=gpu", "--account=proj",
          "--time=24:00:00", "--venv=/shared/venv", "--chdir=/shared/msca_jax",
          "--config=configs/msca_kv.py", "--workdir=/shared/runs/msca_kv"]

_SLURM_SCRIPT = """\
#!/bin/bash
# Written by `python -m launch.slurm` (msca_jax): 2 node(s) x 8 GPU(s), 16 process(es), one per GPU.
#SBATCH --job-name=msca_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --time=24:00:00
#SBATCH --chdir=/shared/msca_jax
#SBATCH --output=/shared/msca_jax/slurm_logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@120
#SBATCH --requeue

# SIGTERM reaches every task 120 s before the time limit (and on preemption or scancel): the
# trainer saves a checkpoint and exits with status 143. The batch shell only notes the signal, so that it
# lives on to the end of the script.
trap 'echo "msca_jax: batch shell got SIGTERM"' TERM
source /shared/venv/bin/activate
# One process per GPU: jax.distributed.initialize() keeps GPU number SLURM_LOCALID in each task.
export TF_CPP_MIN_LOG_LEVEL=2

echo "msca_jax: job ${SLURM_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST}"
srun --label python -m msca_jax.main --config=configs/msca_kv.py --workdir=/shared/runs/msca_kv \
--config.data.path=/shared/data/k400_dmvr
status=$?
if [ "$status" -eq 143 ]; then
  echo "msca_jax: stopped by SIGTERM after saving a checkpoint; requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$status"
sbatch /shared/msca_jax/slurm_logs/msca_jax.sbatch
"""


def test_slurm_dry_run_prints_the_script_and_sbatch(capsys):
  lines = _dry_run(capsys, slurm, _SLURM + ["--requeue", "--",
                                            "--config.data.path=/shared/data/k400_dmvr"])
  assert lines == _SLURM_SCRIPT.splitlines()


def test_slurm_per_host_and_slurm_binding(capsys):
  lines = _dry_run(capsys, slurm, ["--nodes=3", "--gpus_per_node=4", "--per=host",
                                   "--chdir=/s", "--config=c", "--workdir=w",
                                   "--container=nvcr.io/me/msca:1", "--container_mounts=/data:/data",
                                   "--grace_seconds=300", "--sbatch_option=--exclusive"])
  assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --gpus-per-node=4" in lines
  assert "#SBATCH --signal=TERM@300" in lines and "#SBATCH --exclusive" in lines
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
  assert "#SBATCH --requeue" not in lines and not any("scontrol" in l for l in lines)
  assert ("srun --label --container-image=nvcr.io/me/msca:1 --container-mounts=/s:/s,/data:/data "
          "--container-workdir=/s python -m msca_jax.main --config=c --workdir=w") in lines
  lines = _dry_run(capsys, slurm, ["--gpus_per_node=8", "--gpu_binding=slurm", "--chdir=/s",
                                   "--config=c", "--workdir=w"])
  assert "#SBATCH --ntasks-per-node=8" in lines and "#SBATCH --gpus-per-task=1" in lines
  assert "export JAX_LOCAL_DEVICE_IDS=0" in lines
  assert not any("gpus-per-node" in l for l in lines)


@pytest.mark.parametrize("srun_status, restarts, requeued", [
    (143, "0", True), (0, "0", False), (1, "0", False), (143, "3", False)])
def test_slurm_script_requeues_on_143(capsys, stubs, tmp_path, srun_status, restarts, requeued):
  """The script itself, run by bash with stub srun and scontrol."""
  stubs("srun")
  stubs("scontrol")
  lines = _dry_run(capsys, slurm, ["--gpus_per_node=2", "--chdir=/s", "--config=c",
                                   "--workdir=w", "--requeue", "--max_requeues=3", "--env=MY_VAR=x y",
                                   "--"] + TRICKY)
  script = tmp_path / "job.sbatch"
  script.write_text("\n".join(lines[:-1]) + "\n")
  env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT=restarts,
             STUB_EXIT=str(srun_status))
  done = subprocess.run(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
  assert done.returncode == srun_status
  records = stubs.records()
  assert records[0]["name"] == "srun"
  assert records[0]["argv"] == ["--label", "python", "-m", "msca_jax.main", "--config=c",
                                "--workdir=w"] + TRICKY
  assert records[0]["env"]["MY_VAR"] == "x y" and records[0]["env"]["TF_CPP_MIN_LOG_LEVEL"] == "2"
  if requeued:
    assert records[1]["name"] == "scontrol" and records[1]["argv"] == ["requeue", "4242"]
    assert "requeueing job 4242" in done.stdout
  else:
    assert len(records) == 1


def test_slurm_writes_the_script_and_calls_sbatch(capsys, stubs, tmp_path):
  stubs("sbatch")
  assert slurm.main(["--gpus_per_node=1", f"--chdir={tmp_path}", "--config=c", "--workdir=w",
                     "--job_name=j1"]) == 0
  path = tmp_path / "slurm_logs" / "j1.sbatch"
  assert path.read_text().startswith("#!/bin/bash\n")
  assert [r["argv"] for r in stubs.records()] == [[str(path)]]
  assert capsys.readouterr().out.splitlines() == [f"wrote {path}", f"sbatch {path}"]


@pytest.mark.parametrize("argv, message", [
    (["--per=gpu"], "--gpus_per_node is required (--per=gpu starts one process per GPU)"),
    (["--per=host"], "--gpus_per_node is required (--per=host starts one process per node"),
    (["--gpus_per_node=0"], "--gpus_per_node must be at least 1"),
    (["--gpus_per_node=8", "--per=host", "--gpu_binding=slurm"], "needs --per=gpu"),
    (["--gpus_per_node=8", "--time=tomorrow"], "--time expects SLURM's [D-]HH:MM:SS"),
    (["--gpus_per_node=8", "--venv=/v", "--container=img"], "--venv and --container exclude"),
    (["--gpus_per_node=8", "--job_name=my job"], "#SBATCH options are single words"),
    (["--gpus_per_node=8", "--max_requeues=2"], "--max_requeues needs --requeue"),
    (["--gpus_per_node=8", "--per=both"], "argument --per: invalid choice: 'both'"),
    (["--gpus_per_node=8", "--", "--config=x.py"], "--config is set by the launcher"),
])
def test_slurm_bad_flags(capsys, argv, message):
  assert message in _usage_error(capsys, slurm, ["--config=c", "--workdir=w", "--dry-run"] + argv)


# ------------------------------------------------------------------------------------------------
# local


def test_local_build_commands_keeps_other_xla_flags():
  commands = local.build_commands(
      "configs/msca_kv.py:demo", "/tmp/w", 3, devices_per_process=4, port=23456, python="py",
      overrides=TRICKY,
      base_env={"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"})
  for i, (argv, env) in enumerate(commands):
    assert argv == ["py", "-m", "msca_jax.main", "--config=configs/msca_kv.py:demo",
                    "--workdir=/tmp/w", "--coordinator_address=127.0.0.1:23456",
                    "--num_processes=3", f"--process_id={i}"] + TRICKY
    assert env == {"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4",
                   "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  # no port given: a free one, the same for every process
  commands = local.build_commands("c", "w", 2, base_env={})
  ports = {a[5] for a, _ in commands}
  assert len(ports) == 1 and int(ports.pop().rsplit(":", 1)[1]) > 0


def test_local_dry_run(capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  lines = _dry_run(capsys, local, ["--num_processes=2", "--devices_per_process=2", "--port=12345",
                                   "--python=python", "--config=configs/msca_kv.py:demo",
                                   "--workdir=/tmp/two", "--mode=train", "--",
                                   "--config.train.num_steps=4"])
  assert lines == [
      f"XLA_FLAGS='--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2' "
      f"JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 python -m msca_jax.main "
      f"--config=configs/msca_kv.py:demo --workdir=/tmp/two --mode=train "
      f"--coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id={i} "
      f"--config.train.num_steps=4" for i in range(2)]


@pytest.mark.parametrize("argv, message", [
    (["--num_processes=0"], "--num_processes must be at least 1"),
    (["--devices_per_process=0"], "--devices_per_process must be at least 1"),
    (["--port=70000"], "--port must be in 1..65535"),
    (["--", "--process_id=1"], "--process_id is set by the launcher"),
])
def test_local_bad_flags(capsys, argv, message):
  assert message in _usage_error(capsys, local, ["--config=c", "--workdir=w", "--dry-run"] + argv)


_PRINT_ENV = ("import os, sys; print('id', sys.argv[1]); print('xla', os.environ['XLA_FLAGS']); "
              "print('platforms', os.environ['JAX_PLATFORMS'])")


class _Lines:
  def __init__(self):
    self.lines = []

  def write(self, text):
    self.lines += text.splitlines()

  def flush(self):
    pass


def test_local_run_prefixes_every_line():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  out = _Lines()
  codes = local.run([([sys.executable, "-c", _PRINT_ENV, str(i)], env) for i in range(2)], out=out)
  assert codes == [0, 0]
  for i in range(2):
    mine = [l for l in out.lines if l.startswith(f"[process {i}] ")]
    assert mine == [f"[process {i}] id {i}",
                    f"[process {i}] xla --xla_force_host_platform_device_count=2",
                    f"[process {i}] platforms cpu"]


# Waits until file sys.argv[1] exists (written by the other process once it is ready).
_AFTER = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)\n"


def test_local_run_stops_the_others_when_one_fails(tmp_path):
  out = _Lines()
  ready = str(tmp_path / "ready")
  start = time.monotonic()
  outcome = local.supervise(
      [([sys.executable, "-c", "import sys, time; print('sleeping', flush=True); "
                               "open(sys.argv[1], 'w').close(); time.sleep(60)", ready], {}),
       ([sys.executable, "-c", _AFTER + "print('failing'); sys.exit(3)", ready], {})],
      out=out, grace_seconds=5)
  assert time.monotonic() - start < 10
  assert outcome.codes == [-signal.SIGTERM, 3] and outcome.first_failure == 1
  assert local.exit_status(outcome) == 3
  assert "[launch] process 1 exited with status 3: stopping the others" in out.lines
  assert "[process 1] failing" in out.lines and "[process 0] sleeping" in out.lines


def test_local_run_kills_a_process_that_ignores_sigterm(tmp_path):
  ready = str(tmp_path / "ready")
  ignore = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open(sys.argv[1], 'w').close(); time.sleep(60)")
  outcome = local.supervise([([sys.executable, "-c", ignore, ready], {}),
                             ([sys.executable, "-c", _AFTER + "sys.exit(1)", ready], {})],
                            out=_Lines(), grace_seconds=0.5)
  assert outcome.codes == [-signal.SIGKILL, 1]


def test_local_cli_runs_the_processes_and_forwards_sigterm(tmp_path):
  """The CLI on a stub interpreter: SIGTERM to the launcher reaches every process, which exits
  with 143 like the trainer, and the launcher exits with 143."""
  stub = _stub(str(tmp_path), "fake_python", """
      import os, signal, sys, time
      pid = [a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1]
      def stop(*_):
        print("saving on SIGTERM", flush=True)
        sys.exit(143)
      signal.signal(signal.SIGTERM, stop)
      print("ready", os.environ["XLA_FLAGS"], " ".join(sys.argv[1:]), flush=True)
      time.sleep(60)
      """)
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.local", f"--python={stub}", "--num_processes=2",
       "--devices_per_process=3", "--port=23457", "--config=c", "--workdir=w", "--",
       "--config.a=1 2"],
      cwd=common.REPO_ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, XLA_FLAGS=""))
  lines = []
  while sum(l.startswith("[process") and " ready " in l for l in lines) < 2:
    line = proc.stdout.readline()
    assert line, lines
    lines.append(line.rstrip("\n"))
  proc.send_signal(signal.SIGTERM)
  rest, _ = proc.communicate(timeout=20)
  lines += rest.splitlines()
  assert proc.returncode == 143
  for i in range(2):
    assert (f"[process {i}] ready --xla_force_host_platform_device_count=3 -m msca_jax.main "
            f"--config=c --workdir=w --coordinator_address=127.0.0.1:23457 --num_processes=2 "
            f"--process_id={i} --config.a=1 2") in lines
    assert f"[process {i}] saving on SIGTERM" in lines
  assert "[launch] got SIGTERM: sending SIGTERM to every process" in lines
  assert not any("stopping the others" in l for l in lines)  # 143 after a forwarded SIGTERM
  assert lines[-1] == "[launch] exit codes [143, 143]"
