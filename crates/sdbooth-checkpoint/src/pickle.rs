//! A safe reader for the pickles inside PyTorch checkpoints, and a writer for ours.
//!
//! The reader is a small pickle machine that only builds data: dicts, lists, tuples, numbers,
//! strings, and tensor references. It resolves a fixed allow-list of globals (the tensor-rebuild
//! functions, storage types and `collections.OrderedDict`) to data constructors; any other global
//! is refused the moment it appears, so nothing is ever imported or called. Nesting depth, memo
//! size and stack size are bounded so hostile input cannot exhaust memory or the stack.

use std::collections::HashMap;

use crate::dtype::Dtype;

/// A storage as referenced by a persistent id: `('storage', torch.FloatStorage, key, loc, numel)`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub dtype: Dtype,
    pub key: String,
    pub numel: u64,
}

/// What `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` describes.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PVal {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// Containers carry their nesting depth so limits are checked without recursion.
    Tuple(Vec<PVal>, u32),
    List(Vec<PVal>, u32),
    Dict(Vec<(PVal, PVal)>, u32),
    Global(Allowed),
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// The only globals a checkpoint may name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Allowed {
    RebuildTensorV2,
    RebuildParameter,
    OrderedDict,
    StorageType(Dtype),
}

impl PVal {
    fn depth(&self) -> u32 {
        match self {
            PVal::Tuple(_, d) | PVal::List(_, d) | PVal::Dict(_, d) => *d,
            _ => 0,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            PVal::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            PVal::Int(i) => Some(*i),
            PVal::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// Looks a string key up in a dict value.
    pub fn get(&self, key: &str) -> Option<&PVal> {
        match self {
            PVal::Dict(items, _) => items.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }
}

const MAX_DEPTH: u32 = 64;
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 22;

/// Why a pickle was not read.
#[derive(Debug, PartialEq)]
pub enum PickleError {
    /// A global outside the allow-list (the attack path): refused, never resolved.
    Unsafe(String),
    Malformed(String),
}

fn allowed_global(module: &str, name: &str) -> Option<Allowed> {
    use Dtype::*;
    Some(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Allowed::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Allowed::RebuildParameter,
        ("collections", "OrderedDict") => Allowed::OrderedDict,
        ("torch", "FloatStorage") => Allowed::StorageType(F32),
        ("torch", "HalfStorage") => Allowed::StorageType(F16),
        ("torch", "BFloat16Storage") => Allowed::StorageType(BF16),
        ("torch", "DoubleStorage") => Allowed::StorageType(F64),
        ("torch", "LongStorage") => Allowed::StorageType(I64),
        ("torch", "IntStorage") => Allowed::StorageType(I32),
        ("torch", "ShortStorage") => Allowed::StorageType(I16),
        ("torch", "CharStorage") => Allowed::StorageType(I8),
        ("torch", "ByteStorage") => Allowed::StorageType(U8),
        ("torch", "BoolStorage") => Allowed::StorageType(Bool),
        _ => return None,
    })
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| PickleError::Malformed(format!("truncated at byte {}", self.pos)))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or_else(|| bad("unterminated line"))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| bad("line is not UTF-8"))
    }
    fn string(&mut self, n: u64) -> Result<String, PickleError> {
        let n = usize::try_from(n).map_err(|_| bad("string too long"))?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| bad("string is not UTF-8"))
    }
}

fn bad(s: &str) -> PickleError {
    PickleError::Malformed(s.to_string())
}

fn container_depth(items: &[PVal]) -> Result<u32, PickleError> {
    let d = 1 + items.iter().map(PVal::depth).max().unwrap_or(0);
    if d > MAX_DEPTH {
        return Err(bad("nesting too deep"));
    }
    Ok(d)
}

fn to_usize_vec(v: &PVal, what: &str) -> Result<Vec<usize>, PickleError> {
    match v {
        PVal::Tuple(items, _) | PVal::List(items, _) => items
            .iter()
            .map(|i| i.as_int().and_then(|i| usize::try_from(i).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| PickleError::Malformed(format!("{what} has a non-integer element"))),
        _ => Err(PickleError::Malformed(format!("{what} is not a tuple"))),
    }
}

/// Applies an allowed callable to its arguments: the only "calls" this reader makes, and they only
/// build data.
fn call(f: &PVal, args: PVal) -> Result<PVal, PickleError> {
    let PVal::Global(g) = f else { return Err(bad("REDUCE on something that is not a global")) };
    let items = match args {
        PVal::Tuple(items, _) => items,
        _ => return Err(bad("REDUCE arguments are not a tuple")),
    };
    match g {
        Allowed::OrderedDict => Ok(PVal::Dict(Vec::new(), 1)),
        Allowed::RebuildParameter => {
            items.into_iter().next().ok_or_else(|| bad("_rebuild_parameter without a tensor"))
        }
        Allowed::RebuildTensorV2 => {
            if items.len() < 4 {
                return Err(bad("_rebuild_tensor_v2 with too few arguments"));
            }
            let PVal::Storage(storage) = &items[0] else { return Err(bad("tensor without a storage")) };
            let offset = items[1]
                .as_int()
                .and_then(|o| u64::try_from(o).ok())
                .ok_or_else(|| bad("bad storage offset"))?;
            let shape = to_usize_vec(&items[2], "tensor size")?;
            let stride = to_usize_vec(&items[3], "tensor stride")?;
            if shape.len() != stride.len() {
                return Err(bad("tensor size and stride differ in length"));
            }
            Ok(PVal::Tensor(TensorRef { storage: storage.clone(), offset, shape, stride }))
        }
        Allowed::StorageType(_) => Err(bad("storage types are not callable")),
    }
}

fn persistent_load(pid: PVal) -> Result<PVal, PickleError> {
    let PVal::Tuple(items, _) = pid else { return Err(bad("persistent id is not a tuple")) };
    match items.as_slice() {
        [PVal::Str(tag), PVal::Global(Allowed::StorageType(dtype)), key, _location, numel]
            if tag == "storage" =>
        {
            let key = match key {
                PVal::Str(s) => s.clone(),
                PVal::Int(i) => i.to_string(),
                _ => return Err(bad("storage key is not a string")),
            };
            let numel =
                numel.as_int().and_then(|n| u64::try_from(n).ok()).ok_or_else(|| bad("bad storage size"))?;
            Ok(PVal::Storage(StorageRef { dtype: *dtype, key, numel }))
        }
        _ => Err(bad("persistent id is not a tensor storage")),
    }
}

/// Runs the data-only pickle machine over `data` and returns the top-level value.
pub fn load(data: &[u8]) -> Result<PVal, PickleError> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<PVal> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, PVal> = HashMap::new();
    let pop = |stack: &mut Vec<PVal>| stack.pop().ok_or_else(|| bad("stack underflow"));
    let pop_mark = |stack: &mut Vec<PVal>, marks: &mut Vec<usize>| -> Result<Vec<PVal>, PickleError> {
        let m = marks.pop().ok_or_else(|| bad("no MARK"))?;
        if m > stack.len() {
            return Err(bad("MARK above the stack"));
        }
        Ok(stack.split_off(m))
    };
    loop {
        if stack.len() > MAX_STACK || memo.len() > MAX_MEMO {
            return Err(bad("pickle too large"));
        }
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?;
            }
            0x95 => {
                r.u64()?;
            }
            b'.' => return stack.pop().ok_or_else(|| bad("STOP on an empty stack")),
            b'}' => stack.push(PVal::Dict(Vec::new(), 1)),
            b']' => stack.push(PVal::List(Vec::new(), 1)),
            b')' => stack.push(PVal::Tuple(Vec::new(), 1)),
            b'(' => marks.push(stack.len()),
            b'N' => stack.push(PVal::None),
            0x88 => stack.push(PVal::Bool(true)),
            0x89 => stack.push(PVal::Bool(false)),
            b'J' => stack.push(PVal::Int(r.u32()? as i32 as i64)),
            b'K' => stack.push(PVal::Int(r.u8()? as i64)),
            b'M' => stack.push(PVal::Int(r.u16()? as i64)),
            0x8a | 0x8b => {
                let n = if op == 0x8a { r.u8()? as usize } else { r.u32()? as usize };
                if n > 8 {
                    return Err(bad("integer wider than 64 bits"));
                }
                let b = r.take(n)?;
                let mut v: i64 = 0;
                for (i, &byte) in b.iter().enumerate() {
                    v |= (byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(PVal::Int(v));
            }
            b'I' => {
                let l = r.line()?;
                stack.push(match l {
                    "01" => PVal::Bool(true),
                    "00" => PVal::Bool(false),
                    _ => PVal::Int(l.parse().map_err(|_| bad("bad INT"))?),
                });
            }
            b'G' => {
                let b = r.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                stack.push(PVal::Float(f64::from_be_bytes(a)));
            }
            b'X' => {
                let n = r.u32()? as u64;
                stack.push(PVal::Str(r.string(n)?));
            }
            0x8c => {
                let n = r.u8()? as u64;
                stack.push(PVal::Str(r.string(n)?));
            }
            0x8d => {
                let n = r.u64()?;
                stack.push(PVal::Str(r.string(n)?));
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'T' | b'B' => r.u32()? as u64,
                    0x8e => r.u64()?,
                    _ => r.u8()? as u64,
                };
                let n = usize::try_from(n).map_err(|_| bad("bytes too long"))?;
                let b = r.take(n)?.to_vec();
                // Protocol-2 str (BINSTRING) is text in practice; keep bytes otherwise.
                stack.push(match (op, String::from_utf8(b.clone())) {
                    (b'T' | b'U', Ok(s)) => PVal::Str(s),
                    _ => PVal::Bytes(b),
                });
            }
            b'q' | b'r' | 0x94 => {
                let idx = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => r.u32()?,
                    _ => memo.len() as u32,
                };
                let top = stack.last().ok_or_else(|| bad("PUT on an empty stack"))?.clone();
                memo.insert(idx, top);
            }
            b'h' | b'j' => {
                let idx = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                stack.push(memo.get(&idx).cloned().ok_or_else(|| bad("GET of an unknown memo entry"))?);
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                let g =
                    allowed_global(&module, &name).ok_or(PickleError::Unsafe(format!("{module}.{name}")))?;
                stack.push(PVal::Global(g));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                    return Err(bad("STACK_GLOBAL with non-string names"));
                };
                let g = allowed_global(m, n).ok_or_else(|| PickleError::Unsafe(format!("{m}.{n}")))?;
                stack.push(PVal::Global(g));
            }
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                let d = container_depth(&items)?;
                stack.push(PVal::Tuple(items, d));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(bad("stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                let d = container_depth(&items)?;
                stack.push(PVal::Tuple(items, d));
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack, &mut marks)?
                };
                if items.len() % 2 != 0 {
                    return Err(bad("SETITEMS with an odd number of items"));
                }
                let d = container_depth(&items)?;
                let Some(PVal::Dict(dict, depth)) = stack.last_mut() else {
                    return Err(bad("SETITEM on something that is not a dict"));
                };
                *depth = (*depth).max(d);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    // Later values replace earlier ones, as in Python.
                    if let Some(slot) = dict.iter_mut().find(|(ek, _)| *ek == k) {
                        slot.1 = v;
                    } else {
                        dict.push((k, v));
                    }
                }
            }
            b'a' | b'e' => {
                let items =
                    if op == b'a' { vec![pop(&mut stack)?] } else { pop_mark(&mut stack, &mut marks)? };
                let d = container_depth(&items)?;
                let Some(PVal::List(list, depth)) = stack.last_mut() else {
                    return Err(bad("APPEND on something that is not a list"));
                };
                *depth = (*depth).max(d);
                list.extend(items);
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(call(&f, args)?);
            }
            b'b' => {
                // State for an object (e.g. a state dict's `_metadata`): not needed, dropped.
                pop(&mut stack)?;
                if stack.is_empty() {
                    return Err(bad("BUILD on an empty stack"));
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent_load(pid)?);
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack, &mut marks)?;
            }
            b'2' => {
                let top = stack.last().ok_or_else(|| bad("DUP on an empty stack"))?.clone();
                stack.push(top);
            }
            other => return Err(PickleError::Malformed(format!("unsupported pickle opcode 0x{other:02x}"))),
        }
    }
}

/// Writes the protocol-2 pickles of our .ckpt files.
pub struct PickleWriter {
    pub buf: Vec<u8>,
}

impl PickleWriter {
    pub fn new() -> Self {
        PickleWriter { buf: vec![0x80, 2] }
    }
    pub fn op(&mut self, op: u8) {
        self.buf.push(op);
    }
    /// BINUNICODE only: protocol 2 has no SHORT_BINUNICODE, and torch's weights_only reader
    /// rejects opcodes outside the declared protocol.
    pub fn str(&mut self, s: &str) {
        self.buf.push(b'X');
        self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }
    pub fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.buf.extend_from_slice(&[b'K', v as u8]);
        } else if let Ok(i) = i32::try_from(v) {
            self.buf.push(b'J');
            self.buf.extend_from_slice(&i.to_le_bytes());
        } else {
            self.buf.extend_from_slice(&[0x8a, 8]);
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }
    pub fn global(&mut self, module: &str, name: &str) {
        self.buf.push(b'c');
        self.buf.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    pub fn int_tuple(&mut self, v: &[usize]) {
        self.op(b'(');
        for &x in v {
            self.int(x as i64);
        }
        self.op(b't');
    }
    /// `_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())` over storage `key`.
    pub fn tensor(&mut self, storage_type: &str, key: &str, shape: &[usize]) {
        let numel: usize = shape.iter().product();
        let mut stride = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(b'(');
        self.op(b'(');
        self.str("storage");
        self.global("torch", storage_type);
        self.str(key);
        self.str("cpu");
        self.int(numel as i64);
        self.op(b't');
        self.op(b'Q');
        self.int(0);
        self.int_tuple(shape);
        self.int_tuple(&stride);
        self.op(0x89);
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
        self.op(b't');
        self.op(b'R');
    }
}

impl Default for PickleWriter {
    fn default() -> Self {
        Self::new()
    }
}

pub fn storage_type_name(d: Dtype) -> Option<&'static str> {
    use Dtype::*;
    Some(match d {
        F32 => "FloatStorage",
        F16 => "HalfStorage",
        BF16 => "BFloat16Storage",
        F64 => "DoubleStorage",
        I64 => "LongStorage",
        I32 => "IntStorage",
        I16 => "ShortStorage",
        I8 => "CharStorage",
        U8 => "ByteStorage",
        Bool => "BoolStorage",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system_before_anything_else() {
        // cos\nsystem\n(S'touch /tmp/pwned'\ntR.  — the classic payload, protocol 0.
        let evil = b"cos\nsystem\n(S'touch /tmp/sdbooth-pwned'\ntR.";
        assert_eq!(load(evil), Err(PickleError::Unsafe("os.system".into())));
        // Protocol 4 STACK_GLOBAL spelling of the same thing.
        let mut p = vec![0x80, 4, 0x8c, 5];
        p.extend_from_slice(b"posix");
        p.extend_from_slice(&[0x8c, 6]);
        p.extend_from_slice(b"system");
        p.extend_from_slice(&[0x93, b'.']);
        assert_eq!(load(&p), Err(PickleError::Unsafe("posix.system".into())));
    }

    #[test]
    fn round_trips_our_tensor_pickle() {
        let mut w = PickleWriter::new();
        w.op(b'}');
        w.op(b'(');
        w.str("w");
        w.tensor("HalfStorage", "0", &[2, 3]);
        w.str("epoch");
        w.int(-5);
        w.str("big");
        w.int(1 << 40);
        w.op(b'u');
        w.op(b'.');
        let v = load(&w.buf).unwrap();
        let PVal::Tensor(t) = v.get("w").unwrap() else { panic!("not a tensor") };
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.stride, vec![3, 1]);
        assert_eq!(t.storage.dtype, Dtype::F16);
        assert_eq!(v.get("epoch").unwrap().as_int(), Some(-5));
        assert_eq!(v.get("big").unwrap().as_int(), Some(1 << 40));
    }

    #[test]
    fn deep_nesting_and_garbage_are_errors_not_crashes() {
        let mut deep = vec![0x80, 2];
        deep.extend(std::iter::repeat_n(b'(', 10_000));
        deep.extend(std::iter::repeat_n(b't', 10_000));
        deep.push(b'.');
        assert!(matches!(load(&deep), Err(PickleError::Malformed(_))));
        assert!(load(b"").is_err());
        assert!(load(b"\x80\x02h\x05.").is_err());
        assert!(load(b"\x80\x02X\xff\xff\xff\xff").is_err());
    }
}
