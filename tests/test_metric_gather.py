"""Metrics gathered across 2 gloo processes with uneven (and empty) per-rank data equal the pooled values."""

import json
import subprocess
import sys
import textwrap

from bundle_utils import subprocess_env

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import ignite.distributed as idist
    from custom_components.metrics.classification import AUROC, gather_rows, classification_metrics
    from custom_components.metrics.medmnist_metrics import MedMNISTAUC
    from custom_components.data.medmnist import medmnist_metrics

    def run(local_rank, out):
        rank = idist.get_rank()
        g = torch.Generator().manual_seed(0)
        logits, labels = torch.randn(11, 1, generator=g, dtype=torch.float64), torch.tensor([0., 1.] * 5 + [1.])
        ml_logits, ml_labels = torch.randn(11, 3, generator=g), (torch.rand(11, 3, generator=g) > 0.5).float()
        part = slice(0, 4) if rank == 0 else slice(4, 11)  # uneven
        if rank == 0:
            local = torch.arange(6 * (rank + 1), dtype=torch.float64).reshape(-1, 2 * (rank + 1))[:, :2]
        else:
            local = torch.zeros(0, 0, dtype=torch.float64)
        rows = gather_rows(local)
        auc = AUROC(); auc.update((logits[part], labels[part])); value = auc.compute()
        ml = MedMNISTAUC("multi-label")
        if rank == 0:  # rank 1 holds no sample at all
            ml.update((ml_logits, ml_labels))
        ml_value = ml.compute()
        if rank == 0:
            ref_ml = medmnist_metrics("multi-label", torch.sigmoid(ml_logits.double()).numpy(), ml_labels.numpy())
            json.dump({"rows": rows.tolist(), "auroc": value, "ml_auc": ml_value,
                       "ref_auroc": classification_metrics(torch.sigmoid(logits[:, 0]), labels)["auroc"],
                       "ref_ml_auc": ref_ml["AUC"]},
                      open(out, "w"))

    if __name__ == "__main__":
        with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
            parallel.run(run, sys.argv[1])
    """
)


def test_uneven_gather_over_two_processes(tmp_path):
    out, script = tmp_path / "result.json", tmp_path / "gather_script.py"
    script.write_text(SCRIPT)  # spawned workers import the function from a file, not from `-c`
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rows"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert abs(result["auroc"] - result["ref_auroc"]) < 1e-12
    assert abs(result["ml_auc"] - result["ref_ml_auc"]) < 1e-9
