# The driver of `halo bench --collective`: joins the Ray cluster, places one rank on each node
# (a fresh worker process per transport variant, so RCCL reads its environment anew), runs
# torch.distributed collectives there and prints one JSON line prefixed "HALO_COLLECTIVE_RESULT ".
# argv[1]: the JSON spec written by halo (see halo/src/collective/mod.rs).
import json
import os
import socket
import sys
import time

import ray

SPEC = json.loads(sys.argv[1])


def rank_main(rank, world, init_method, spec, variant):
    # A fresh worker process per variant (max_calls=1): RCCL reads these at initialisation.
    os.environ.update(variant["env"])
    import datetime
    import tempfile

    import torch
    import torch.distributed as dist

    backend = spec["backend"]
    log_path = None
    if backend == "nccl":
        log_path = os.path.join(tempfile.gettempdir(), "halo-collective-%d.nccl.log" % os.getpid())
        os.environ["NCCL_DEBUG_FILE"] = log_path
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=spec["timeout_secs"]),
    )
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)

    def sync():
        if backend == "nccl":
            torch.cuda.synchronize()

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    # Small integers are exact in bf16 and fp32, so the checks compare exactly.
    def pattern(count, dtype, offset):
        base = torch.arange(count, device=device, dtype=torch.int64) % 13 + 1 + offset
        return base.to(dtype)

    inject = int(spec.get("inject_wrong", 0))

    def corrupt(t):
        # Stands in for a transport that delivers wrong bytes: the check must count them.
        if inject and rank == 0:
            flat = t.view(-1)
            n = min(inject, flat.numel())
            flat[:n] += 1000

    rows = []
    for op in spec["ops"]:
        for tname in spec["dtypes"]:
            dtype = dtypes[tname]
            elem = torch.tensor([], dtype=dtype).element_size()
            for size in spec["sizes"]:
                if op == "all_reduce":
                    count = size // elem
                    buf = pattern(count, dtype, 0) * (rank + 1)

                    def run_op():
                        dist.all_reduce(buf)

                    def check():
                        buf.copy_(pattern(count, dtype, 0) * (rank + 1))
                        dist.all_reduce(buf)
                        sync()
                        corrupt(buf)
                        want = pattern(count, dtype, 0) * (world * (world + 1) // 2)
                        return int((buf != want).sum().item())

                else:
                    count = size // elem // world
                    src = pattern(count, dtype, 0) + rank * 16
                    outs = [torch.empty(count, dtype=dtype, device=device) for _ in range(world)]

                    def run_op():
                        dist.all_gather(outs, src)

                    def check():
                        for o in outs:
                            o.zero_()
                        dist.all_gather(outs, src)
                        sync()
                        corrupt(outs[0])
                        wrong = 0
                        for r, o in enumerate(outs):
                            wrong += int((o != pattern(count, dtype, 0) + r * 16).sum().item())
                        return wrong

                if count == 0:
                    continue
                for _ in range(spec["warmup"]):
                    run_op()
                sync()
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(spec["iters"]):
                    run_op()
                sync()
                elapsed = time.perf_counter() - t0
                wrong = check()
                rows.append(
                    {
                        "op": op,
                        "dtype": tname,
                        "size": count * elem * (world if op == "all_gather" else 1),
                        "count": count,
                        "time_us": elapsed / spec["iters"] * 1e6,
                        "wrong": wrong,
                    }
                )

    decode = []
    for n_ops, size in spec["decode"]:
        dtype = dtypes[spec["decode_dtype"]]
        elem = torch.tensor([], dtype=dtype).element_size()
        count = size // elem
        bufs = [pattern(count, dtype, 0) * (rank + 1) for _ in range(n_ops)]

        def step():
            for b in bufs:
                dist.all_reduce(b)
            sync()

        step()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(spec["decode_steps"]):
            step()
        elapsed = time.perf_counter() - t0
        for b in bufs:
            b.copy_(pattern(count, dtype, 0) * (rank + 1))
        step()
        corrupt(bufs[0])
        want = pattern(count, dtype, 0) * (world * (world + 1) // 2)
        wrong = sum(int((b != want).sum().item()) for b in bufs)
        decode.append(
            {
                "ops": n_ops,
                "size": size,
                "dtype": spec["decode_dtype"],
                "step_us": elapsed / spec["decode_steps"] * 1e6,
                "wrong": wrong,
            }
        )

    dist.destroy_process_group()
    lines = []
    if log_path and os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
        os.unlink(log_path)
    return {
        "rank": rank,
        "node_ip": ray.util.get_node_ip_address(),
        # Where the rank ran, as the rank itself sees it (inside the node's container).
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "python": sys.executable,
        "prefix": sys.prefix,
        "torch": torch.__version__,
        "torch_path": os.path.dirname(torch.__file__),
        "rows": rows,
        "decode": decode,
        "log": lines,
    }


def free_port(ip):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def main():
    ray.init(address=SPEC["address"], _node_ip_address=SPEC["head_ip"], log_to_driver=False)
    alive = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    missing = [ip for ip in SPEC["node_ips"] if ip not in alive]
    if missing:
        raise SystemExit("nodes not in the Ray cluster: %s (alive: %s)" % (missing, sorted(alive)))
    world = len(SPEC["node_ips"])
    results = []
    for variant in SPEC["variants"]:
        port = free_port(SPEC["head_ip"])
        init_method = "tcp://%s:%d" % (SPEC["head_ip"], port)
        refs = []
        for rank, ip in enumerate(SPEC["node_ips"]):
            task = ray.remote(max_calls=1)(rank_main).options(
                num_cpus=0,
                num_gpus=0,
                resources={"node:%s" % ip: 0.001},
            )
            refs.append(task.remote(rank, world, init_method, SPEC, variant))
        try:
            ranks = ray.get(refs, timeout=SPEC["timeout_secs"])
            results.append({"name": variant["name"], "ranks": ranks})
        except Exception as e:  # one variant failing must not hide the others
            for r in refs:
                ray.cancel(r, force=True)
            results.append({"name": variant["name"], "error": "%s: %s" % (type(e).__name__, str(e)[-2000:])})
    ray.shutdown()
    print("HALO_COLLECTIVE_RESULT " + json.dumps(results), flush=True)


main()
