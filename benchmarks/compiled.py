"""What the Triton kernels compile to for the H100 (sm_90a), measured without a GPU.

Every kernel variant the pipeline launches on a GPU is compiled with its H100 config by
Triton's code generator and Triton's bundled ptxas (``-arch=sm_90a -v``), and the compiled
code is read for the facts that decide its speed before any GPU run:

- registers per thread and spills (ptxas);
- wgmma warnings: ptxas serialised the wgmma instructions (C7515, C7520: no overlap of the
  tensor-core pipeline) or injected warpgroup.arrive fences it could not prove unneeded (C7519);
- wgmma: bf16 dots on Hopper tensor cores; asynchronous wgmma: a ``wgmma.wait_group`` with
  pendings > 0, i.e. one product stays in flight while the next K step is issued (Triton does
  this only when every shared-memory operand of the dot is multi-buffered);
- cp.async: software-pipelined loads from global to shared memory, and their count;
- shared memory per program (Triton's metadata).

``tests/test_triton_kernels.py`` asserts on these facts (no spills, no wgmma warnings, asynchronous
wgmma in every bf16 GEMM kernel); ``python -m benchmarks.compiled --write`` records the table
in ``benchmarks/RESULTS.md`` (block ``compiled-sm90a``). It must run without
``TRITON_INTERPRET`` (the interpreter never runs the code generator): ``report()`` runs this
module in a subprocess with ``TRITON_INTERPRET=0``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TAG = "compiled-sm90a"


def ptxas_path() -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


def _compile_all() -> List[Dict[str, object]]:
    """Compiles every variant in this process (TRITON_INTERPRET must be unset)."""
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton_kernels import (_shared, covariance, cross_entropy, dense_scores, eigen_correction, factored_scores,
                                self_influence)

    ptxas = ptxas_path()
    unit = {"s_xk", "s_xd", "s_qc", "s_lj", "s_gd", "s_ad", "s_pj"}  # inner strides: specialised == 1 at run time
    report: List[Dict[str, object]] = []

    def build(fn, sig, consts, cfg, label, gemm=True, nodiv=()):
        consts = dict(consts, **_shared.block_sizes(cfg))
        consts.update({k: 1 for k in sig if k in unit})
        sig = dict(sig, **{k: "constexpr" for k in consts})
        # what run-time specialisation knows for aligned tensors and sizes that are multiples of 16
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
                 if (v.startswith("*") or v == "i32") and k not in nodiv}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=_shared.launch_options(cfg))
        ptx = k.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            res = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                 text=True)
        finally:
            os.unlink(f.name)
        info = res.stderr.splitlines()
        regs = [int(m.group(1)) for line in info for m in [re.search(r"Used (\d+) registers", line)] if m]
        spill = [int(m.group(1)) for line in info for m in [re.search(r"(\d+) bytes spill stores", line)] if m]
        waits = [int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
        report.append(dict(
            label=label, ok=res.returncode == 0, gemm=gemm, config=dict(cfg),
            registers=max(regs) if regs else None, spill_bytes=max(spill) if spill else 0,
            spills=[line.strip() for line in info if "spill" in line and " 0 bytes spill stores" not in line],
            serialized=[line.strip() for line in info if re.search(r"C75(15|19|20)|Performance Loss", line)],
            wgmma=ptx.count("wgmma.mma_async"), async_wgmma=any(w > 0 for w in waits),
            cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            pipelined=k.asm["ttgir"].count("async_copy_global_to_local") > 0,
            shared_bytes=getattr(k.metadata, "shared", None)))

    for tdt, pt, tl_dt in [(torch.bfloat16, "*bf16", tl.bfloat16), (torch.float32, "*fp32", tl.float32)]:
        flags = _shared.dot_flags(tdt)
        i32 = lambda *names: {n: "i32" for n in names}
        # the rotated tokens are fp32 whatever the inputs (eigen_correction.rotated_dtype_of)
        build(_shared._rotate_kernel, dict(x_ptr=pt, m_ptr="*u8", q_ptr=pt, out_ptr="*fp32", **i32(
            "T", "K", "C", "col0", "s_xn", "s_xt", "s_xk", "s_mn", "s_mt", "s_qk", "s_qc", "s_on", "s_ot")),
            dict(HAS_MASK=True, COMPUTE=tl_dt, SPLIT_K_TAIL=False, **flags), _shared.ROTATE_H100[tdt], f"rotate {tdt}")
        if tdt == torch.bfloat16:  # a biased layer's K = d + 1: whole slices, then the tail
            build(_shared._rotate_kernel, dict(x_ptr=pt, m_ptr="*u8", q_ptr=pt, out_ptr="*fp32", **i32(
                "T", "K", "C", "col0", "s_xn", "s_xt", "s_xk", "s_mn", "s_mt", "s_qk", "s_qc", "s_on", "s_ot")),
                dict(HAS_MASK=True, COMPUTE=tl_dt, SPLIT_K_TAIL=True, **flags), _shared.ROTATE_H100[tdt], f"rotate {tdt} bias column",
                nodiv=("K",))  # K = 769: nothing known about it
        build(covariance._covariance_kernel, dict(x_ptr=pt, m_ptr="*u8", out_ptr="*fp32", tiles_ptr="*i32", **i32(
            "T", "D", "n_row_blocks", "blocks_per_split", "s_xn", "s_xt", "s_xd", "s_mn", "s_mt", "s_os")),
            dict(HAS_MASK=True, EDGE=True, **flags), covariance.H100[tdt], f"covariance {tdt}")
        if tdt == torch.bfloat16:  # tiles inside an odd D (769): row masks only
            build(covariance._covariance_kernel, dict(x_ptr=pt, m_ptr="*u8", out_ptr="*fp32", tiles_ptr="*i32", **i32(
                "T", "D", "n_row_blocks", "blocks_per_split", "s_xn", "s_xt", "s_xd", "s_mn", "s_mt", "s_os")),
                dict(HAS_MASK=True, EDGE=False, **flags), covariance.H100[tdt], f"covariance {tdt} inside odd D",
                nodiv=("D", "s_os"))
        # The Gram kernels read fp32 rotated tokens for every input (rotated_dtype_of): IEEE dots
        # for fp32 inputs, tf32 for bf16 / fp16 ones. D_IN / SLAB unhinted (769 for a biased
        # layer); the load widths and row strides are multiples of 16 (the temporaries are padded).
        if tdt == torch.float32:
            for inputs in (torch.float32, torch.bfloat16):
                dots = eigen_correction.rotated_dot_flags(inputs)
                what = "float32" if inputs == torch.float32 else "bfloat16 / float16 (fp32 rotated, tf32)"
                build(eigen_correction._eigen_correction_kernel, dict(g_ptr=pt, a_ptr=pt, out_ptr="*fp32", **i32(
                    "n_docs", "T", "D_IN", "SLAB", "D_IN_LD", "SLAB_LD", "row0", "s_gn", "s_gt", "s_an", "s_at",
                    "s_oi")), dict(ACCUMULATE=True, **dots), eigen_correction.H100[tdt], f"eigen_correction {what}",
                    nodiv=("D_IN", "SLAB"))
                build(self_influence._self_influence_kernel, dict(g_ptr=pt, a_ptr=pt, lam_ptr="*fp32",
                    part_ptr="*fp32", damping="fp32", **i32("T", "D_IN", "SLAB", "D_IN_LD", "SLAB_LD", "row0", "doc0",
                                                            "n_tj", "s_gn", "s_gt", "s_an", "s_at", "s_li", "s_lj",
                                                            "s_pn")),
                    dots, eigen_correction.H100[tdt], f"self_influence {what}", nodiv=("D_IN", "SLAB", "s_li"))
        for per_token in (False, True):
            build(factored_scores._factored_scores_kernel, dict(desc_ptr="*i64", **i32("N", "Q", "S", "n_cb")),
                  dict(ACT_T=tl_dt, GRAD_T=tl_dt, LEFT_T=tl_dt, RIGHT_T=tl_dt, COMPUTE=tl_dt, PER_TOKEN=per_token,
                       RP=32, NF=factored_scores.NF, ALIGNED=True, K_ALIGNED=True, SPLIT_K_TAIL=False, **flags),
                  factored_scores.H100[tdt], f"factored_scores {tdt} per_token={per_token}")
        # the largest rank one launch takes (higher ranks go in slices of it): one query per
        # column block, and a column block at least that wide
        widest = dict(factored_scores.H100[tdt])
        widest["BLOCK_C"] = max(widest["BLOCK_C"], factored_scores.MAX_RANK)
        build(factored_scores._factored_scores_kernel, dict(desc_ptr="*i64", **i32("N", "Q", "S", "n_cb")),
              dict(ACT_T=tl_dt, GRAD_T=tl_dt, LEFT_T=tl_dt, RIGHT_T=tl_dt, COMPUTE=tl_dt, PER_TOKEN=False,
                   RP=factored_scores.MAX_RANK, NF=factored_scores.NF, ALIGNED=True, K_ALIGNED=True,
                   SPLIT_K_TAIL=False, **flags),
              widest, f"factored_scores {tdt} rank {factored_scores.MAX_RANK} (the most one launch takes)")
        if tdt == torch.bfloat16:  # biased layers: aligned rows, K = d + 1 (main slices + CUDA-core tail)
            build(factored_scores._factored_scores_kernel, dict(desc_ptr="*i64", **i32("N", "Q", "S", "n_cb")),
                  dict(ACT_T=tl_dt, GRAD_T=tl_dt, LEFT_T=tl_dt, RIGHT_T=tl_dt, COMPUTE=tl_dt, PER_TOKEN=False,
                       RP=32, NF=factored_scores.NF, ALIGNED=True, K_ALIGNED=False, SPLIT_K_TAIL=True, **flags),
                  factored_scores.H100[tdt], f"factored_scores {tdt} bias column (K tail)")
        dense_strides = ("s_gn", "s_gt", "s_gd", "s_an", "s_at", "s_ad", "s_pq", "s_pi", "s_pj", "s_mn", "s_mt")
        build(dense_scores._dense_pairwise_kernel, dict(g_ptr=pt, a_ptr=pt, p_ptr=pt, m_ptr="*u8", part_ptr="*fp32",
              **i32("N", "T", "D_OUT", "D_IN", "Q", *dense_strides, "s_pn", "s_pqq")),
              dict(HAS_MASK=True, COMPUTE=tl_dt, **flags), dense_scores.H100_PAIRWISE[tdt], f"dense_scores {tdt}")
        build(dense_scores._dense_per_token_kernel, dict(g_ptr=pt, a_ptr=pt, p_ptr=pt, m_ptr="*u8", out_ptr="*fp32",
              **i32("T", "D_OUT", "D_IN", *dense_strides, "s_on", "s_ot")),
              dict(HAS_MASK=True, COMPUTE=tl_dt, **flags), dense_scores.H100_PER_TOKEN[tdt], f"dense_scores {tdt} per_token")
        for sample in (False, True):
            build(cross_entropy._cross_entropy_rows_kernel, dict(x_ptr=pt, labels_ptr="*i64", loss_ptr="*fp32",
                  seed="i64", **i32("V", "s_x", "s_label")), dict(SAMPLE=sample, INTERP_FIX=False), cross_entropy.H100,
                  f"cross_entropy_rows {tdt} sample={sample}", gemm=False)
    return report


def report(cache_dir: Optional[str] = None, timeout: int = 600) -> List[Dict[str, object]]:
    """Compiles every variant in a subprocess without TRITON_INTERPRET; raises if ptxas is
    missing or the compilation fails."""
    if ptxas_path() is None:
        raise FileNotFoundError("Triton's bundled ptxas is missing")
    # "0", not unset: importing the benchmarks package on a machine without a GPU would
    # otherwise turn the interpreter on (setdefault)
    env = dict(os.environ, TRITON_INTERPRET="0")
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    res = subprocess.run([sys.executable, "-m", "benchmarks.compiled", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"compiling the kernels for sm_90a failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(rows: List[Dict[str, object]]) -> str:
    import triton

    def cfg(c):
        return " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in c.items())

    lines = [f"### Compiled for sm_90a without a GPU (triton {triton.__version__}, its bundled ptxas)", "",
             "Each kernel variant with its H100 config, as `python -m benchmarks.compiled --write` "
             "compiled it; see that module for what each column means. Not a speed measurement: the facts "
             "of the compiled code that decide it.", "",
             "| kernel | config | registers | spill bytes | C7515/19/20 | wgmma | async wgmma | cp.async | shared KB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {cfg(r['config'])} | {r['registers']} | {r['spill_bytes']} | "
                     f"{'yes' if r['serialized'] else 'no'} | {r['wgmma']} | "
                     f"{('yes' if r['async_wgmma'] else 'no') if r['wgmma'] else '-'} | {r['cp_async']} | "
                     f"{'-' if r['shared_bytes'] is None else round(r['shared_bytes'] / 1024, 1)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="compile here and print the report as JSON (one line)")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.json:
        print(json.dumps(_compile_all()))
        return 0
    md = markdown(report())
    if args.write:
        from benchmarks.run import write_markdown_block

        write_markdown_block(os.path.join(HERE, "RESULTS.md"), TAG, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
