"""The README's "Using mmsafe in your own JAX code" snippet runs as written, and
what it prints holds: its radii follow Thm 3.3 and its sound ones survive the attack."""

import contextlib
import io
import os
import re

import jax
import numpy as np
import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_snippet() -> str:
  with open(README) as f:
    text = f.read()
  section = text.split("## Using mmsafe in your own JAX code", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 1, "the section must hold exactly one python block"
  return blocks[0]


@pytest.mark.slow
def test_snippet_is_short_and_runs_with_sound_radii_unbroken():
  code = readme_snippet()
  assert len(code.strip().splitlines()) < 30
  namespace: dict = {}
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  lines = stdout.getvalue().splitlines()
  assert [line.split(":")[0] for line in lines] == ["local", "sound"]
  assert lines[1].endswith("broke 0/64"), lines[1]

  # Independently: Thm 3.3 radius min_k margin_k / ||eta_k|| from the full
  # Jacobians (jax.jacobian per example), and the sound constants bound them.
  x, y, scores_fn = namespace["x"], np.asarray(namespace["y"]), namespace["scores_fn"]
  cert, sound = namespace["cert"], namespace["sound"]
  logits = np.asarray(namespace["logits_fn"](x))
  for b in range(0, 64, 9):
    margins, eta_sq = [], []
    for k in range(logits.shape[1]):
      if k == y[b]:
        continue
      margins.append(logits[b, y[b]] - logits[b, k])
      eta_sq.append(sum(float(sound[m][b, k]) ** 2 for m in x))
      for m in x:
        one = {n: v[b:b + 1] for n, v in x.items()}
        jac = jax.jacobian(lambda v, m=m: scores_fn({**one, m: v})[m][0])(one[m])
        local = np.linalg.norm(np.asarray(jac[y[b]] - jac[k]))
        assert local <= float(sound[m][b, k]) * (1 + 1e-5)  # sound >= local gradient norm
    expected = min(mg / np.sqrt(e) for mg, e in zip(margins, eta_sq))
    np.testing.assert_allclose(float(cert.radius[b]), expected, rtol=1e-5)
