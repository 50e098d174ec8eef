"""Evaluation metrics and reports: exact with padding and masks, exactly once, readable outputs."""

import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msca_jax.data import pipeline
from msca_jax.train import evaluate

NAMES = ("a", "b", "c", "d", "e", "f")


def one_hot_logits(predicted, num_classes=len(NAMES), scale=5.0):
  """Logits whose top-1 is `predicted` and whose ranking is otherwise by class index."""
  logits = -0.1 * np.tile(np.arange(num_classes, dtype=np.float32), (len(predicted), 1))
  logits[np.arange(len(predicted)), predicted] = scale
  return logits


def keys(*names):
  return np.array([n.encode() for n in names], dtype=object)


def test_average_views_numpy_jit_and_folded():
  view_logits = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  expected = view_logits.mean(axis=1)
  np.testing.assert_allclose(evaluate.average_views(view_logits), expected)
  np.testing.assert_allclose(jax.jit(evaluate.average_views)(jnp.asarray(view_logits)), expected)
  # The model's folded output: the views of one video adjacent.
  folded = view_logits.reshape(6, 4)
  np.testing.assert_allclose(evaluate.average_views(folded, num_views=3), expected)
  # bfloat16 logits are averaged in float32.
  averaged = jax.jit(evaluate.average_views)(jnp.asarray(view_logits, jnp.bfloat16))
  assert averaged.dtype == jnp.float32
  with pytest.raises(ValueError, match="expects"):
    evaluate.average_views(folded)


def test_imbalanced_metrics_against_hand_computed_values():
  # Class a: 6 videos, 5 right; class b: 2 videos, 0 right (predicted c, then top-2 b);
  # class c: 2 videos, 1 right. Classes d..f absent.
  labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
  predicted = np.array([0, 0, 0, 0, 0, 3, 2, 2, 2, 0])
  logits = one_hot_logits(predicted)
  logits[6:8, 1] = 4.0  # b second for the two b videos: right at top-5, wrong at top-1
  acc = evaluate.EvalAccumulator(len(NAMES), NAMES)
  acc.add(logits, labels, np.ones(10), keys(*[f"v{i}" for i in range(10)]))
  result = acc.result()
  assert result.num_videos == 10
  assert result.top1 == pytest.approx(6 / 10)
  # Labels a..c always rank in the top 4 (the rest are ranked by index): top-5 is perfect.
  assert result.top5 == pytest.approx(1.0)
  assert result.mean_class_accuracy == pytest.approx((5 / 6 + 0 / 2 + 1 / 2) / 3)
  assert result.mean_class_accuracy != pytest.approx(result.top1)
  np.testing.assert_array_equal(result.per_class_count, [6, 2, 2, 0, 0, 0])
  np.testing.assert_allclose(result.per_class_accuracy[:3], [5 / 6, 0, 0.5])
  assert np.all(np.isnan(result.per_class_accuracy[3:]))
  expected_confusion = np.zeros((6, 6), int)
  np.add.at(expected_confusion, (labels, predicted), 1)
  np.testing.assert_array_equal(result.confusion, expected_confusion)
  assert result.confusion.sum() == 10


def test_top5_counts_rank_exactly():
  # 7 classes: the true class ranked 5th is right at top-5, ranked 6th is wrong.
  logits = np.array([[7, 6, 5, 4, 3, 2, 1], [7, 6, 5, 4, 3, 2, 1]], np.float32)
  acc = evaluate.EvalAccumulator(7)
  acc.add(logits, np.array([4, 5]), np.ones(2), keys("x", "y"))
  result = acc.result()
  assert result.top1 == 0.0
  assert result.top5 == 0.5
  preds = acc.predictions()
  np.testing.assert_array_equal(preds.top_classes[0], [0, 1, 2, 3, 4])
  top5_mass = np.exp(np.arange(3, 8.0)).sum() / np.exp(np.arange(1, 8.0)).sum()
  np.testing.assert_allclose(preds.top_probs.sum(axis=1), [top5_mass] * 2)
  assert np.all(np.diff(preds.top_probs, axis=1) < 0)


def test_exact_with_padding_and_masks_whatever_the_masked_logits_hold():
  labels = np.array([0, 1, 2, 3, 0, 0, 0, 0])
  logits = one_hot_logits(labels)
  mask = np.array([1, 1, 1, 1, 0, 0, 0, 0])
  logits[4] = np.nan            # a skipped record: garbage
  logits[5] = np.inf
  logits[6:] = 1e30             # padding
  errors = np.array([0, 0, 0, 0, 2, 5, 0, 0])
  batch_keys = keys("v0", "v1", "v2", "v3", "", "", "", "")
  acc = evaluate.EvalAccumulator(len(NAMES), NAMES)
  acc.add(logits, labels, mask, batch_keys, errors)
  # A second, all-padding batch changes nothing but keys nothing either (key b'' repeats freely).
  acc.add(np.full((8, 6), np.nan), np.zeros(8), np.zeros(8), keys(*[""] * 8), np.zeros(8))
  result = acc.result()
  assert result.num_videos == 4
  assert result.top1 == 1.0 and result.top5 == 1.0 and result.mean_class_accuracy == 1.0
  assert result.num_nonfinite == 0 and result.num_unkeyed == 0
  assert result.confusion.sum() == 4
  assert result.skipped == {"corrupt_shard": 0, "undecodable": 1, "label_out_of_range": 0,
                            "no_frames": 0, "missing_frames": 1, "frame_count_mismatch": 0}
  assert result.num_skipped == 2
  assert len(acc.predictions()) == 4
  assert acc.predictions().keys == ("v0", "v1", "v2", "v3")


def test_same_metrics_in_one_batch_or_many_padded_batches():
  rng = np.random.default_rng(0)
  n, c, batch = 23, 6, 8
  labels = rng.integers(0, c, n)
  logits = rng.normal(size=(n, c)).astype(np.float32) + 1.5 * np.eye(c)[labels]
  names = [f"video{i}" for i in range(n)]
  whole = evaluate.EvalAccumulator(c)
  whole.add(logits, labels, np.ones(n), names)
  batched = evaluate.EvalAccumulator(c)
  pad = (-n) % batch
  padded_logits = np.concatenate([logits, rng.normal(size=(pad, c)) * 1e6])
  padded_labels = np.concatenate([labels, np.zeros(pad, int)])
  padded_mask = np.concatenate([np.ones(n), np.zeros(pad)])
  padded_keys = names + [""] * pad
  for s in range(0, n + pad, batch):
    batched.add(padded_logits[s:s + batch], padded_labels[s:s + batch], padded_mask[s:s + batch],
                padded_keys[s:s + batch])
  a, b = whole.result(), batched.result()
  assert (a.num_videos, a.top1, a.top5, a.mean_class_accuracy) == (
      b.num_videos, b.top1, b.top5, b.mean_class_accuracy)
  np.testing.assert_array_equal(a.confusion, b.confusion)
  assert a.top1 == np.mean(np.argmax(logits, axis=1) == labels)


def test_duplicates_are_rejected_and_leave_the_accumulator_unchanged():
  acc = evaluate.EvalAccumulator(len(NAMES), NAMES)
  acc.add(one_hot_logits([0, 1]), np.array([0, 1]), np.ones(2), keys("v0", "v1"))
  with pytest.raises(ValueError, match="'v1' evaluated twice"):
    acc.add(one_hot_logits([2, 1]), np.array([2, 1]), np.ones(2), ["v2", "v1"])  # str keys too
  with pytest.raises(ValueError, match="'v3' evaluated twice"):
    acc.add(one_hot_logits([3, 3]), np.array([3, 3]), np.ones(2), keys("v3", "v3"))
  result = acc.result()
  assert result.num_videos == 2 and result.confusion.sum() == 2
  # A masked-out row may repeat a key (e.g. a skipped record): it is not evaluated.
  acc.add(one_hot_logits([2]), np.array([2]), np.zeros(1), keys("v1"), np.array([2]))
  assert acc.result().num_videos == 2


def test_unkeyed_and_nonfinite_videos_are_counted():
  acc = evaluate.EvalAccumulator(len(NAMES), NAMES)
  logits = one_hot_logits([0, 1, 2])
  logits[2, 3] = np.nan  # a masked-in NaN is a wrong answer, not a prediction of any class
  acc.add(logits, np.array([0, 1, 2]), np.ones(3), keys("", "", "v2"))
  result = acc.result()
  assert result.num_videos == 3 and result.num_unkeyed == 2 and result.num_nonfinite == 1
  assert result.top1 == pytest.approx(2 / 3) and result.top5 == pytest.approx(2 / 3)
  assert result.confusion.sum() == 2 and result.per_class_count[2] == 1
  assert acc.predictions().top_classes[2, 0] == -1


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels=np.array([0, 6])), "labels outside"),
    (dict(errors=np.array([1, 0])), "mask must be"),
    (dict(mask=np.array([1, 0]), errors=np.array([0, 9])), "unknown error codes"),
    (dict(logits=np.zeros((2, 5))), "logits of shape"),
])
def test_bad_batches_are_refused(kwargs, message):
  batch = dict(logits=one_hot_logits([0, 1]), labels=np.array([0, 1]), mask=np.ones(2),
               keys=keys("v0", "v1"), errors=np.zeros(2))
  batch.update(kwargs)
  with pytest.raises(ValueError, match=message):
    evaluate.EvalAccumulator(len(NAMES), NAMES).add(**batch)


def test_empty_result_is_nan_not_an_error():
  result = evaluate.EvalAccumulator(3).result()
  assert result.num_videos == 0
  assert math.isnan(result.top1) and math.isnan(result.mean_class_accuracy)
  assert "n/a" in evaluate.format_summary_table(result)


def test_skip_codes_match_the_pipeline():
  errors = np.array([0, 1, 2, 2, 3, 4, 4, 4])
  acc = evaluate.EvalAccumulator(2)
  acc.add(np.zeros((8, 2)), np.zeros(8), np.zeros(8), [""] * 8, errors)
  assert acc.result().skipped == pipeline.skip_summary(errors)


def test_pair_accuracy_on_a_crafted_confusion():
  # 4 classes, pairs (0, 1) and (2, 3). Row 0: 6 right, 3 partner, 1 other pair.
  confusion = np.array([[6, 3, 1, 0],
                        [4, 4, 0, 2],
                        [0, 0, 10, 0],
                        [0, 0, 5, 5]])
  result = evaluate.pair_accuracy(confusion)
  in_pair = 6 + 3 + 4 + 4 + 10 + 0 + 5 + 5
  assert result["pair_accuracy"] == pytest.approx(in_pair / confusion.sum())
  assert result["within_pair_accuracy"] == pytest.approx((6 + 4 + 10 + 5) / in_pair)
  # A frame-wise model on time-reversed pairs: the right pair, a coin toss within it.
  frame_wise = np.kron(np.eye(4, dtype=int), np.full((2, 2), 25))
  assert evaluate.pair_accuracy(frame_wise) == {"pair_accuracy": 1.0, "within_pair_accuracy": 0.5}
  with pytest.raises(ValueError, match="even"):
    evaluate.pair_accuracy(np.eye(3))


def _small_run():
  labels = np.array([0, 0, 1, 2, 3, 4, 5, 5, 0, 0])
  predicted = np.array([0, 1, 1, 2, 3, 5, 5, 5, 0, 0])
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
  errors = np.array([0, 0, 0, 0, 0, 0, 0, 0, 3, 0])
  acc = evaluate.EvalAccumulator(len(NAMES), NAMES)
  acc.add(one_hot_logits(predicted), labels, mask,
          keys(*[f"dir/video,{i}.mp4" for i in range(8)], "", ""), errors)
  return acc, acc.result()


def test_reports_are_written_and_parse(tmp_path):
  acc, result = _small_run()
  protocol = {"num_clips": 10, "num_crops": 3, "num_frames": 8, "stride": 32, "step": 1000}
  paths = evaluate.write_reports(str(tmp_path / "eval"), "test", result, acc, protocol)
  assert sorted(os.path.basename(p) for p in paths.values()) == [
      "test_confusion.png", "test_metrics.json", "test_predictions.csv"]

  with open(paths["metrics"]) as f:
    report = json.load(f)
  assert report["split"] == "test" and report["protocol"] == protocol
  assert report["num_videos"] == 8
  # Video 5 (e predicted f) ranks e last of six: the one top-5 miss.
  assert report["metrics"] == {"top1": 6 / 8, "top5": 7 / 8,
                               "mean_class_accuracy": pytest.approx((0.5 + 4) / 6)}
  assert report["skipped"]["label_out_of_range"] == 1
  assert report["confusion"] == result.confusion.tolist()
  assert report["per_class"][1] == {"class": 1, "name": "b", "count": 1, "accuracy": 1.0}

  with open(paths["predictions"], newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == result.num_videos
  assert rows[1]["key"] == "dir/video,1.mp4"  # quoted, commas survive
  assert (rows[1]["label_name"], rows[1]["top1_name"], rows[1]["correct"]) == ("a", "b", "0")
  assert rows[1]["top2_name"] == "a" and rows[1]["correct_top5"] == "1"
  assert sum(int(r["correct"]) for r in rows) == 6
  assert sum(int(r["correct_top5"]) for r in rows) == 7
  assert 0.9 < float(rows[0]["top1_prob"]) < 1.0

  with open(paths["confusion"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_confusion_picture_for_large_label_sets(tmp_path):
  acc = evaluate.EvalAccumulator(60)
  acc.add(np.eye(60)[:3], np.arange(3), np.ones(3), ["x", "y", "z"])
  paths = evaluate.write_reports(str(tmp_path), "val", acc.result(), acc)
  assert "confusion" not in paths and not (tmp_path / "val_confusion.png").exists()
  table = evaluate.format_summary_table(acc.result(), {"views": 3})
  assert "videos" in table and "top-1" in table
  assert len(table.splitlines()) < 20  # no 60 per-class rows


def test_summary_table_shows_the_numbers():
  _, result = _small_run()
  table = evaluate.format_summary_table(result, {"num_clips": 10, "num_crops": 3},
                                        title="test: MSCA-KV")
  print(table)
  lines = table.splitlines()
  assert lines[0].startswith("== test: MSCA-KV ")
  assert len(lines[0]) == len(lines[-1]) == max(map(len, lines))  # the rules frame the table
  assert "videos evaluated" in table and " 8" in lines[1]
  assert "30 (10 clips x 3 crops)" in table
  assert "75.00 %" in table          # top-1
  assert "87.50 %" in table          # top-5
  assert f"{100 * (0.5 + 4) / 6:.2f} %" in table  # mean class accuracy
  assert any(line.split() == ["label_out_of_range", "1"] for line in lines)
  assert any(line.split() == ["skipped", "records", "1"] for line in lines)
  assert any(line.split() == ["e", "1", "0.00", "%"] for line in lines)  # per-class rows
