//! CLIP tokenizer files for Diffusers output (`tokenizer/vocab.json`, `tokenizer/merges.txt`),
//! built from the BPE merges sdbooth-data embeds, so saved folders load with
//! `StableDiffusionPipeline.from_pretrained` offline. SD1 (CLIP-L) and SD2 (OpenCLIP-H) share the
//! vocabulary; only the pad token differs (tokenizer_config.json).

use std::io::Read;

/// open_clip's `bpe_simple_vocab_16e6.txt` cut to CLIP's 48,894 merges, in HF's merges.txt format
/// (`#version: 0.2` first). One copy in the repository: sdbooth-data's tokenizer asset.
const MERGES_GZ: &[u8] = include_bytes!("../../sdbooth-data/assets/clip_bpe_merges.txt.gz");

/// HF's merges.txt, exactly.
pub fn clip_merges_txt() -> Result<String, String> {
    let mut s = String::new();
    flate2::read::GzDecoder::new(MERGES_GZ).read_to_string(&mut s).map_err(|e| format!("merges: {e}"))?;
    Ok(s)
}

/// GPT-2/CLIP's byte → printable char table, in vocabulary order.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter().filter_map(char::from_u32).collect()
}

/// HF's vocab.json: byte symbols, the same with `</w>`, one token per merge, then the two specials.
pub fn clip_vocab_json() -> Result<String, String> {
    let merges = clip_merges_txt()?;
    let mut vocab: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let with_w: Vec<String> = vocab.iter().map(|c| format!("{c}</w>")).collect();
    vocab.extend(with_w);
    for line in merges.lines().skip(1).filter(|l| !l.is_empty()) {
        vocab.push(line.replace(' ', ""));
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    if vocab.len() != 49408 {
        return Err(format!("CLIP vocabulary has {} tokens, expected 49408", vocab.len()));
    }
    let map: serde_json::Map<String, serde_json::Value> =
        vocab.into_iter().enumerate().map(|(i, t)| (t, serde_json::Value::from(i))).collect();
    serde_json::to_string(&map).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn vocab_has_clips_ids() {
        let v: serde_json::Value = serde_json::from_str(&super::clip_vocab_json().unwrap()).unwrap();
        // Known CLIP ids: "a</w>" 320, "photo</w>" 1125, "cat</w>" 2368, specials at the end.
        assert_eq!(v["a</w>"], 320);
        assert_eq!(v["photo</w>"], 1125);
        assert_eq!(v["cat</w>"], 2368);
        assert_eq!(v["<|startoftext|>"], 49406);
        assert_eq!(v["<|endoftext|>"], 49407);
        assert_eq!(v["!"], 0);
    }
}
