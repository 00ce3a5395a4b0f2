"""Reads a log directory written by fabric::TensorBoardLogger with TensorBoard's own EventAccumulator and
prints its scalars, text and hparams plugin content; exits 1 if something expected is missing or differs.

Where Python's tensorboard is installed (`pip install tensorboard`; no TensorFlow needed), from the
repository root, with a build of the tests in build/ (any build dir works):

    export FABRIC_TB_SAMPLE_DIR=$(mktemp -d)
    build/tests/fabric_core_tests '[.tensorboard-sample]'      # prints the run's directory
    python3 tests/python/read_tensorboard.py "$FABRIC_TB_SAMPLE_DIR" \
        --expected "$FABRIC_TB_SAMPLE_DIR"/lightning_logs/version_0/expected.json

Without pip, TensorBoard's sources serve as well: a checkout of tensorflow/tensorboard with its protos
compiled in place (`protoc -I. --python_out=. $(find tensorboard -name '*.proto')`), Debian's
python3-protobuf and python3-absl, and `PYTHONPATH=<checkout>` (its TensorFlow stub reads the records and
checks their CRCs).

Without --expected it reads every run (a directory holding event files) under the log directory and
requires each to have the "brain.Event:2" file version, at least one scalar and the three hparams
summaries (experiment, session start, session end) naming metrics that are logged as scalars; each
--expect-text TAG also requires a text summary with that tag. With --expected (the JSON file the sample
test writes beside its events) the run holding that file must also have exactly its scalars (step and
float32 value; NaN and infinities included), text, hyper-parameters (value and type) and metric names.
Exit status: 0 when all is found, 1 when something is missing or differs, 2 for a bad command line.
"""
import argparse
import json
import math
import os
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

HPARAMS_TAGS = ("_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info")
# Keep every event, not a reservoir sample (0 means no limit).
SIZE_GUIDANCE = {
    event_accumulator.COMPRESSED_HISTOGRAMS: 0,
    event_accumulator.IMAGES: 0,
    event_accumulator.AUDIO: 0,
    event_accumulator.SCALARS: 0,
    event_accumulator.HISTOGRAMS: 0,
    event_accumulator.TENSORS: 0,
}


def find_runs(logdir):
    """Returns the directories under logdir (itself included) that hold event files, sorted."""
    runs = []
    for root, _dirs, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents.") for f in files):
            runs.append(root)
    return sorted(runs)


def plugin_content(acc, plugin):
    """Returns {tag: content bytes} of a plugin, empty when the run has none."""
    try:
        return dict(acc.PluginTagToContent(plugin))
    except KeyError:
        return {}


def load(run):
    """Reads one run: its file version, scalars, text and hparams plugin data."""
    acc = event_accumulator.EventAccumulator(run, size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags[event_accumulator.SCALARS]}
    text = {}
    for tag in plugin_content(acc, "text"):
        text[tag] = [(e.step, [s.decode("utf-8") for s in e.tensor_proto.string_val]) for e in acc.Tensors(tag)]
    hparams = {}
    for tag, content in plugin_content(acc, "hparams").items():
        hparams[tag] = plugin_data_pb2.HParamsPluginData.FromString(content)
    return acc.file_version, scalars, text, hparams


def value_of(v):
    """Returns a google.protobuf.Value's kind and value."""
    kind = v.WhichOneof("kind")
    return kind, getattr(v, kind) if kind else None


def show(run, file_version, scalars, text, hparams):
    print(f"run {run} (file_version {file_version})")
    for tag in sorted(scalars):
        points = ", ".join(f"{s}: {v!r}" for s, v in scalars[tag])
        print(f"  scalar {tag!r} ({len(scalars[tag])}): {points}")
    for tag in sorted(text):
        for step, strings in text[tag]:
            print(f"  text {tag!r} at step {step}: {strings!r}")
    for tag in sorted(hparams):
        data = hparams[tag]
        which = data.WhichOneof("data")
        print(f"  hparams {tag!r}: version {data.version}, {which}")
        if which == "experiment":
            for info in data.experiment.hparam_infos:
                print(f"    hparam {info.name!r}: {api_pb2.DataType.Name(info.type)}")
            for info in data.experiment.metric_infos:
                print(f"    metric {info.name.tag!r}")
        elif which == "session_start_info":
            for name in sorted(data.session_start_info.hparams):
                kind, value = value_of(data.session_start_info.hparams[name])
                print(f"    {name!r} = {value!r} ({kind})")
        elif which == "session_end_info":
            print(f"    status {api_pb2.Status.Name(data.session_end_info.status)}")


def same_number(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def check_run(file_version, scalars, text, hparams, expect_text):
    """Returns what a run lacks that every run from fabric::TensorBoardLogger has."""
    problems = []
    if file_version != 2.0:
        problems.append(f"file version {file_version!r}, expected 2 (brain.Event:2)")
    if not scalars:
        problems.append("no scalars")
    for tag in HPARAMS_TAGS:
        if tag not in hparams:
            problems.append(f"no {tag} summary")
    # The hparams plugin's own parsers check the plugin data's version and which message it holds.
    parsers = {
        "_hparams_/experiment": hparams_metadata.parse_experiment_plugin_data,
        "_hparams_/session_start_info": hparams_metadata.parse_session_start_info_plugin_data,
        "_hparams_/session_end_info": hparams_metadata.parse_session_end_info_plugin_data,
    }
    for tag, parse in parsers.items():
        if tag in hparams:
            try:
                parse(hparams[tag].SerializeToString())
            except Exception as e:  # noqa: BLE001 - any failure of the plugin's parser is reported
                problems.append(f"the hparams plugin cannot parse {tag}: {e}")
    if "_hparams_/experiment" in hparams:
        experiment = hparams["_hparams_/experiment"].experiment
        if not experiment.metric_infos:
            problems.append("the experiment names no metric")
        for info in experiment.metric_infos:
            if info.name.tag not in scalars:
                problems.append(f"the experiment's metric {info.name.tag!r} is not logged as a scalar")
    if "_hparams_/session_end_info" in hparams:
        status = hparams["_hparams_/session_end_info"].session_end_info.status
        if status != api_pb2.STATUS_SUCCESS:
            problems.append(f"session end status {api_pb2.Status.Name(status)}, expected STATUS_SUCCESS")
    for tag in expect_text:
        if tag not in text:
            problems.append(f"no text {tag!r}")
    return problems


def compare(expected, scalars, text, hparams):
    """Returns how the run differs from the expected JSON."""
    problems = []
    for tag, points in expected["scalars"].items():
        got = scalars.get(tag)
        if got is None:
            problems.append(f"no scalar {tag!r}")
            continue
        want = [(int(s), float(v)) for s, v in points]
        if len(got) != len(want) or any(gs != ws or not same_number(gv, wv) for (gs, gv), (ws, wv) in zip(got, want)):
            problems.append(f"scalar {tag!r}: found {got}, expected {want}")
    for tag in scalars:
        if tag not in expected["scalars"]:
            problems.append(f"unexpected scalar {tag!r}")
    for tag, want in expected["text"].items():
        got = [strings for _step, strings in text.get(tag, [])]
        if got != [[want]]:
            problems.append(f"text {tag!r}: found {got!r}, expected {[[want]]!r}")
    start = hparams.get("_hparams_/session_start_info")
    experiment = hparams.get("_hparams_/experiment")
    if start is None or experiment is None:
        return problems + ["no hyper-parameters to compare"]
    types = {info.name: info.type for info in experiment.experiment.hparam_infos}
    values = start.session_start_info.hparams
    for name, want in expected["hparams"].items():
        if name not in values:
            problems.append(f"no hyper-parameter {name!r}")
            continue
        kind, got = value_of(values[name])
        if isinstance(want, bool):
            want_kind, want_type = "bool_value", api_pb2.DATA_TYPE_BOOL
        elif isinstance(want, (int, float)):
            want_kind, want_type = "number_value", api_pb2.DATA_TYPE_FLOAT64
        else:
            want_kind, want_type = "string_value", api_pb2.DATA_TYPE_STRING
        if kind != want_kind or not (got == want or (want_kind == "number_value" and same_number(got, float(want)))):
            problems.append(f"hyper-parameter {name!r}: found {got!r} ({kind}), expected {want!r} ({want_kind})")
        if types.get(name) != want_type:
            found = api_pb2.DataType.Name(types[name]) if name in types else "no HParamInfo"
            problems.append(f"hyper-parameter {name!r}: type {found}, expected {api_pb2.DataType.Name(want_type)}")
    if set(values) != set(expected["hparams"]) or set(types) != set(expected["hparams"]):
        problems.append(f"hyper-parameters {sorted(values)} / infos {sorted(types)}, expected {sorted(expected['hparams'])}")
    metrics = [info.name.tag for info in experiment.experiment.metric_infos]
    if metrics != expected["metrics"]:
        problems.append(f"metrics {metrics}, expected {expected['metrics']}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", help="a log directory (root_dir, root_dir/name or a run's directory)")
    parser.add_argument("--expected", help="the expected.json that the [.tensorboard-sample] test writes")
    parser.add_argument("--expect-text", action="append", default=[], metavar="TAG", help="require a text summary")
    args = parser.parse_args(argv)

    runs = find_runs(args.logdir)
    if not runs:
        print(f"FAIL: no event files under {args.logdir}", file=sys.stderr)
        return 1
    problems = []
    loaded = {}
    for run in runs:
        loaded[run] = load(run)
        show(run, *loaded[run])
        problems += [f"{run}: {p}" for p in check_run(*loaded[run], args.expect_text)]
    if args.expected:
        with open(args.expected, encoding="utf-8") as f:
            expected = json.load(f)
        run = os.path.dirname(os.path.abspath(args.expected))
        match = [r for r in runs if os.path.abspath(r) == run]
        if not match:
            problems.append(f"{args.expected} lies in no run of {args.logdir}")
        else:
            _file_version, scalars, text, hparams = loaded[match[0]]
            problems += [f"{run}: {p}" for p in compare(expected, scalars, text, hparams)]
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"OK: {len(runs)} run(s) read by TensorBoard's EventAccumulator" + (", as expected" if args.expected else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
