"""GPU: time the _topn kernel launch configurations a decode step could use (rows = B*G, one query
each), 50 launches captured in one CUDA graph, replayed; microseconds per launch."""
import torch
import triton

from nsa.ops.triton_scoring import _topn

dev = torch.device("cuda")
for nb in (1024, 2048):
    for R in (2, 16):
        G = 2
        sc = torch.rand(R // G, G, nb, device=dev)
        pos = torch.tensor([nb * 64 - 1], device=dev)
        nbp = triton.next_power_of_2(nb)
        line = []
        for block_r in (1, 2, 4):
            for warps in (1, 2, 4, 8):
                idx = torch.empty(R // G, 1, G, 16, device=dev, dtype=torch.long)

                def launch():
                    _topn[(triton.cdiv(R, block_r),)](sc, idx, pos, G * nb, 0, nb, *idx.stride()[:3], R, 1, 0, nb,
                                                      G=G, SEL=64, NSEL=16, NSP=16, NBP=nbp, BLOCK_R=block_r,
                                                      POS_PTR=True, num_warps=warps)
                launch()
                ref = idx.clone()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(50):
                        launch()
                g.replay()
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(10):
                    g.replay()
                b.record()
                torch.cuda.synchronize()
                assert torch.equal(idx, ref)
                line.append(f"r{block_r}w{warps} {a.elapsed_time(b) / 500 * 1000:.1f}")
        print(f"nb={nb} rows={R}: " + "  ".join(line), flush=True)
