//! Prints a bbolt file's buckets and keys (hex), for looking at etcd's files:
//! `cargo run -p keel-bbolt --example bbolt-dump -- FILE [--copy OUT]` (`--copy` rewrites the
//! file with the writer).
fn hex(b: &[u8]) -> String {
    if b.iter().all(|c| c.is_ascii_graphic()) {
        return String::from_utf8_lossy(b).into_owned();
    }
    b.iter().map(|c| format!("{c:02x}")).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: bbolt-dump FILE [--copy OUT]")?;
    let db = keel_bbolt::Db::open(std::path::Path::new(path))?;
    println!("meta: {:?}", db.meta());
    let out = if args.get(2).map(String::as_str) == Some("--copy") { args.get(3).cloned() } else { None };
    let mut w = match &out {
        Some(o) => Some(keel_bbolt::Writer::new(std::fs::File::create(o)?)?),
        None => None,
    };
    for b in db.buckets()? {
        println!("bucket {}", hex(&b));
        if let Some(w) = w.as_mut() {
            w.bucket(&b)?;
        }
        db.for_each(&b, &mut |k, v| {
            println!("  {} = {} ({} bytes)", hex(k), hex(&v[..v.len().min(40)]), v.len());
            if let Some(w) = w.as_mut() {
                w.put(k, v).map_err(|e| keel_bbolt::Error { file: "out".into(), offset: 0, msg: e.to_string() })?;
            }
            Ok(())
        })?;
    }
    if let Some(w) = w {
        w.finish()?;
    }
    Ok(())
}
