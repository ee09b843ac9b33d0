//! The training layouts on hand-made captions, so a failure names the rule that broke (the parity
//! test says only that ids differ).

use sdbooth_data::tokenizer::{ClipTokenizer, TokenizerError, BOS_ID, EOS_ID, MODEL_MAX_LENGTH, SD2_PAD_ID};

fn sd1() -> ClipTokenizer {
    ClipTokenizer::sd1().unwrap_or_else(|e| panic!("{e}"))
}

fn sd2() -> ClipTokenizer {
    ClipTokenizer::sd2().unwrap_or_else(|e| panic!("{e}"))
}

/// A caption of exactly `n` tokens ("a" is one token).
fn words(n: usize) -> String {
    vec!["a"; n].join(" ")
}

#[test]
fn default_length_is_one_padded_window() -> Result<(), TokenizerError> {
    let w = sd1().tokenize_for_training("a photo of sks dog", None, false)?;
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].len(), MODEL_MAX_LENGTH);
    assert_eq!(w[0][..7], [BOS_ID, 320, 1125, 539, 48136, 1929, EOS_ID]);
    assert!(w[0][7..].iter().all(|&id| id == EOS_ID), "SD1 pads with EOS");
    let w2 = sd2().tokenize_for_training("a photo of sks dog", Some(75), false)?;
    assert!(w2[0][7..].iter().all(|&id| id == SD2_PAD_ID), "SD2 pads with '!' (0)");
    Ok(())
}

#[test]
fn long_captions_are_cut_at_75_150_225() -> Result<(), TokenizerError> {
    let tok = sd1();
    let caption = words(300);
    for (mtl, windows) in [(None, 1), (Some(150), 2), (Some(225), 3)] {
        let w = tok.tokenize_for_training(&caption, mtl, false)?;
        assert_eq!(w.len(), windows);
        for win in &w {
            assert_eq!(win.len(), MODEL_MAX_LENGTH);
            assert_eq!((win[0], win[76]), (BOS_ID, EOS_ID));
            assert!(win[1..76].iter().all(|&id| id == 320));
        }
    }
    Ok(())
}

#[test]
fn sd2_windows_get_eos_at_their_edges() -> Result<(), TokenizerError> {
    // 80 tokens with 225: window 1 is full (its last id becomes EOS, the padded sequence ends in
    // pad), window 2 holds 5 tokens then EOS, window 3 is empty: BOS EOS pad ….
    let w = sd2().tokenize_for_training(&words(80), Some(225), false)?;
    assert_eq!(w.len(), 3);
    assert_eq!(w[0][75..], [320, EOS_ID]);
    assert_eq!(w[1][..7], [BOS_ID, 320, 320, 320, 320, 320, EOS_ID]);
    assert_eq!(w[1][76], SD2_PAD_ID);
    assert_eq!(w[2][..3], [BOS_ID, EOS_ID, SD2_PAD_ID]);
    // SD1 needs no rewriting: pad is EOS already.
    let w1 = sd1().tokenize_for_training(&words(80), Some(225), false)?;
    assert_eq!(w1[2][..3], [BOS_ID, EOS_ID, EOS_ID]);
    Ok(())
}

#[test]
fn sd2_treats_exclamation_marks_as_its_pad_token() {
    assert_eq!(sd1().encode("wow!"), vec![2781, 256]);
    assert_eq!(sd2().encode("wow!"), vec![2781, SD2_PAD_ID]);
}

#[test]
fn no_token_padding_gives_one_unpadded_window() -> Result<(), TokenizerError> {
    let tok = sd2();
    let short = tok.tokenize_for_training("a dog", Some(225), true)?;
    assert_eq!(short, vec![vec![BOS_ID, 320, 1929, EOS_ID]]);
    let long = tok.tokenize_for_training(&words(100), Some(150), true)?;
    assert_eq!(long.len(), 1);
    assert_eq!(long[0].len(), MODEL_MAX_LENGTH, "truncated at CLIP's 77 whatever max_token_length says");
    let batch = tok.pad_batch(&[short[0].clone(), vec![BOS_ID, 320, 320, 320, 320, EOS_ID]]);
    assert_eq!(batch[0], vec![BOS_ID, 320, 1929, EOS_ID, SD2_PAD_ID, SD2_PAD_ID]);
    Ok(())
}

#[test]
fn unsupported_max_token_length_is_an_error() {
    let err = sd1().tokenize_for_training("a", Some(100), false);
    assert!(matches!(err, Err(TokenizerError::MaxTokenLength(100))));
}

#[test]
fn weights_follow_their_tokens_into_windows() -> Result<(), TokenizerError> {
    let tok = sd1();
    let w = tok.tokenize_weighted("a (dog:1.5) [cat]", None)?;
    assert_eq!(w.ids[0][..5], [BOS_ID, 320, 1929, 2368, EOS_ID]);
    assert_eq!(w.weights[0][..5], [1.0, 1.0, 1.5, (1.0f64 / 1.1) as f32, 1.0]);
    // 80 plain tokens then a weighted one: it lands in the second window's sixth slot.
    let caption = format!("{} (dog:2)", words(80));
    let w = tok.tokenize_weighted(&caption, Some(150))?;
    assert_eq!(w.ids.len(), 2);
    assert_eq!((w.ids[1][6], w.weights[1][6]), (1929, 2.0));
    assert!(w.weights[0].iter().all(|&x| x == 1.0));
    Ok(())
}

#[test]
fn bpe_cache_gives_the_same_ids_twice() {
    let tok = sd1();
    let first = tok.encode("unbelievably photorealistic café");
    assert_eq!(tok.encode("unbelievably photorealistic café"), first);
    assert!(first.len() >= 3);
}

/// `cargo test -p sdbooth-data --release --test tokenizer_layout -- --ignored --nocapture`
#[test]
#[ignore = "timing, not a check"]
fn throughput() -> Result<(), TokenizerError> {
    let start = std::time::Instant::now();
    let tok = sd1();
    println!("tables built in {:.3}s", start.elapsed().as_secs_f64());
    let captions: Vec<String> = (0..2000)
        .map(|i| {
            format!(
                "1girl, solo, long hair, looking at viewer, smile, “sks” photo {i}, café, ＡＢＣ, &amp; more"
            )
        })
        .collect();
    let start = std::time::Instant::now();
    let mut n = 0;
    for c in &captions {
        n += tok.tokenize_for_training(c, Some(225), false)?.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} captions in {:.3}s: {:.0} captions/s ({n} windows)",
        captions.len(),
        secs,
        captions.len() as f64 / secs
    );
    Ok(())
}

#[test]
fn decode_and_clean_show_what_clip_sees() {
    let tok = sd1();
    let ids = tok.encode("A “Photo”  of ＳＫＳ dog&amp;cat");
    assert_eq!(tok.clean("A “Photo”  of ＳＫＳ dog&amp;cat"), "a \"photo\" of sks dog&cat");
    assert_eq!(tok.decode(&ids), "a \" photo \" of sks dog & cat");
}
