use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for inp in [576usize, 1536] {
        let x = Tensor::randn(0f32, 1., (1024, inp), &dev)?;
        let u = Tensor::randn(0f32, 1., (1024, 16), &dev)?;
        let dy = Tensor::randn(0f32, 1., (1024, inp), &dev)?;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..200 {
                let _ = u.t()?.matmul(&x)?;
            }
            let a = t.elapsed().as_secs_f64() / 200.0;
            let t = Instant::now();
            for _ in 0..200 {
                let _ = x.t()?.matmul(&u)?.t()?.contiguous()?;
            }
            let b = t.elapsed().as_secs_f64() / 200.0;
            let t = Instant::now();
            for _ in 0..200 {
                let _ = dy.t()?.matmul(&u)?;
            }
            let c = t.elapsed().as_secs_f64() / 200.0;
            let t = Instant::now();
            for _ in 0..200 {
                let _ = u.matmul(&Tensor::randn(0f32, 1., (16, inp), &dev)?)?;
            }
            let d = t.elapsed().as_secs_f64() / 200.0;
            println!(
                "in {inp}: uT.x {:.1} us, (xT.u)T {:.1} us, dyT.u {:.1} us, u.B-ish {:.1} us",
                a * 1e6,
                b * 1e6,
                c * 1e6,
                d * 1e6
            );
        }
    }
    Ok(())
}
