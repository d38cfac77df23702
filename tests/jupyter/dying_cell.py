"""The kernel survives a dying cell: a cell that aborts, segfaults, overflows its stack or runs
out of memory gets an error that says what happened and that the variables were lost, and the
next cell runs at once with the prelude (no kernel restart, no rebuild)."""

import time

from kernel_env import check, execute, start_kernel

CASES = [
    ("abort", "std::process::abort();", "aborted"),
    ("segmentation fault", "unsafe { (0x10 as *mut u64).write_volatile(1); }", "segmentation fault"),
    (
        "stack overflow",
        "fn down(n: u64) -> u64 { let a = std::hint::black_box([n; 64]); if n == 0 { 0 } else { down(n - 1) + a[0] } }\n"
        "down(u64::MAX)",
        "overflowed its stack",
    ),
    ("out of memory", "let v: Vec<u8> = Vec::with_capacity(1 << 46);\nv.capacity()", "out of memory"),
]


def text_result(msgs):
    for _, m in msgs:
        if m["msg_type"] == "execute_result":
            return m["content"]["data"].get("text/plain")
    return None


def main():
    km, kc = start_kernel()
    try:
        reply, msgs, _ = execute(kc, "let kept: u64 = 42;\nkept")
        check(reply["content"]["status"] == "ok", reply["content"])
        for name, code, expected in CASES:
            reply, msgs, _ = execute(kc, "let kept: u64 = 42;")
            check(reply["content"]["status"] == "ok", (name, reply["content"]))
            t = time.monotonic()
            reply, msgs, _ = execute(kc, code)
            content = reply["content"]
            check(content["status"] == "error", (name, content))
            check(content["ename"] == "ProcessTerminated", (name, content))
            evalue = content["evalue"]
            check(expected in evalue, f"{name}: the error does not say `{expected}`: {evalue}")
            check("variables" in evalue and "lost" in evalue, f"{name}: {evalue}")
            errors = [m for _, m in msgs if m["msg_type"] == "error"]
            check(errors and errors[0]["content"]["evalue"] == evalue, (name, msgs))
            # The kernel is the same process and answers at once; the variables are gone, the
            # prelude is there.
            check(km.is_alive(), f"{name}: the kernel died")
            reply, msgs, _ = execute(kc, "kept")
            check(reply["content"]["status"] == "error", (name, "kept survived", reply["content"]))
            t_next = time.monotonic()
            reply, msgs, _ = execute(kc, "Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap().dims().len()")
            check(reply["content"]["status"] == "ok", (name, reply["content"]))
            check(text_result(msgs) == "2", (name, msgs))
            print(f"{name}: reported in {t_next - t:.1f} s; next prelude cell {time.monotonic() - t_next:.1f} s; {evalue.splitlines()[0]}")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
