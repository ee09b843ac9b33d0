// End-to-end: `sdbooth ui` in Debian's headless Chromium, driven by playwright-core.
// On a copy of examples/toy with builtin:tiny-sd1: open the UI with its token, fill the form
// with the toy folders, see the dry-run bucket table, start a 30-step run with samples every 10
// steps, see the loss curve and a sample image, wait for the end, find the model in the
// checkpoint list. Screenshots of each page go to $SCREENSHOTS (default ./screenshots).
//
// Env: SDBOOTH (the binary), CHROMIUM (default /usr/bin/chromium), SCREENSHOTS.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { cpSync, mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '../../..');
const sdbooth = process.env.SDBOOTH || path.join(repo, 'target/release/sdbooth');
const shots = process.env.SCREENSHOTS || path.join(here, 'screenshots');

// Starts the UI on a free port and resolves with its printed URL.
function startUi(cwd, workdir) {
  const child = spawn(sdbooth, ['ui', '--no-browser', '--port', '0', '--workdir', workdir], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stderr.on('data', (d) => process.stderr.write(`[ui] ${d}`));
  const url = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no URL printed: ${out}`)), 30000);
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/http:\/\/127\.0\.0\.1:\d+\/\?token=[0-9a-f]+/);
      if (m) { clearTimeout(timer); resolve(m[0]); }
    });
    child.on('exit', (code) => reject(new Error(`sdbooth ui exited (${code}): ${out}`)));
  });
  return { child, url };
}

test('set up, check, run and watch a toy run in the browser', { timeout: 15 * 60 * 1000 }, async () => {
  const tmp = mkdtempSync(path.join(tmpdir(), 'sdbooth-ui-e2e-'));
  cpSync(path.join(repo, 'examples/toy'), path.join(tmp, 'toy'), { recursive: true, filter: (p) => !p.includes(`${path.sep}out`) });
  mkdirSync(shots, { recursive: true });
  const ui = startUi(tmp, path.join(tmp, 'ui-runs'));
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run'],
  });
  try {
    const url = await ui.url;
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));

    // Without the token: 401.
    const denied = await page.goto(url.replace(/\?token=.*/, ''));
    assert.equal(denied.status(), 401);

    await page.goto(url);
    await page.waitForSelector('#flag-groups details');
    // The flag groups come from the CLI's definitions.
    for (const group of ['Training', 'Optimizer', 'Saving', 'Sampling']) {
      assert.ok(await page.locator(`details[data-group="${group}"]`).count(), group);
    }
    await page.fill('#model', 'builtin:tiny-sd1');
    await page.fill('#instance_dir', path.join(tmp, 'toy/instance'));
    await page.fill('#instance_repeats', '10');
    await page.fill('#class_tokens', 'sks dog');
    await page.fill('#reg_dir', path.join(tmp, 'toy/reg'));
    await page.fill('#reg_repeats', '1');
    await page.fill('#reg_class_tokens', 'dog');
    await page.fill('#resolution', '128');
    await page.fill('#output_name', 'toy');
    await page.fill('#sample_prompts', 'a photo of sks dog --w 64 --h 64 --s 4 --d 3');
    const flags = {
      max_train_steps: '30', learning_rate: '1e-4', optimizer_type: 'AdamW', seed: '42', min_bucket_reso: '64',
      max_bucket_reso: '256', sample_every_n_steps: '10', max_data_loader_n_workers: '1',
    };
    // As a person would: open a closed flag group before typing into it.
    const openGroupOf = async (id) => {
      const closed = page.locator(`details.group:not([open]):has(#${id}) > summary`);
      if (await closed.count()) await closed.click();
    };
    for (const [k, v] of Object.entries(flags)) {
      await openGroupOf(`flag-${k}`);
      await page.fill(`#flag-${k}`, v);
    }
    await openGroupOf('flag-save_model_as');
    await page.selectOption('#flag-save_model_as', 'safetensors');
    await openGroupOf('flag-cache_latents');
    await page.check('#flag-cache_latents');
    await page.screenshot({ path: path.join(shots, '1-setup.png'), fullPage: true });

    await page.click('#btn-check');
    await page.waitForSelector('#check-banner.ok', { timeout: 120000 });
    const bucketRows = await page.locator('#bucket-table tr').count();
    assert.ok(bucketRows >= 2, `bucket table rows: ${bucketRows}`);
    assert.match(await page.textContent('#steps-table'), /30/);
    assert.match(await page.textContent('#cmdline'), /sdbooth train .*--max_train_steps=30/);
    assert.match(await page.textContent('#config-toml'), /max_train_steps = 30/);
    await page.screenshot({ path: path.join(shots, '2-check.png'), fullPage: true });

    await page.click('#btn-start');
    await page.waitForURL(/#run\//, { timeout: 120000 });
    // The loss curve: a polyline with at least two points.
    await page.waitForFunction(() => {
      const p = document.querySelector('#loss-chart polyline');
      return p && Number(p.dataset.points) >= 2;
    }, null, { timeout: 300000 });
    // A sample image, loaded.
    await page.waitForFunction(() => [...document.querySelectorAll('#samples img')].some((i) => i.complete && i.naturalWidth > 0),
      null, { timeout: 300000 });
    await page.screenshot({ path: path.join(shots, '3-run-live.png'), fullPage: true });

    await page.waitForSelector('#run-status.finished', { timeout: 600000 });
    const model = page.locator('#checkpoints a', { hasText: 'download' });
    await model.first().waitFor({ timeout: 30000 });
    assert.match(await page.textContent('#checkpoints'), /toy\.safetensors/);
    assert.match(await page.textContent('[data-stat="step"]'), /^30 \/ 30/);
    const href = await model.first().getAttribute('href');
    const resp = await page.request.get(new URL(href, url).toString());
    assert.equal(resp.status(), 200);
    assert.ok((await resp.body()).length > 1000, 'the model downloads');
    await page.screenshot({ path: path.join(shots, '4-run-finished.png'), fullPage: true });

    // The runs list after a reload shows the finished run with its report.
    await page.goto(new URL('/#runs', url).toString());
    await page.waitForSelector('#runs-table .badge.finished');
    assert.ok(await page.locator('#runs-table a', { hasText: 'report' }).count());
    await page.screenshot({ path: path.join(shots, '5-runs.png'), fullPage: true });
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
    ui.child.kill('SIGINT');
    rmSync(tmp, { recursive: true, force: true });
  }
});
