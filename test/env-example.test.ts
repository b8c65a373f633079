// .env.example is the settings' documentation: it must list every setting, with its real default.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { configSchema, loadConfig } from '../src/config.js';

const example = readFileSync(new URL('../.env.example', import.meta.url), 'utf8');
const entries = Object.fromEntries(
  example
    .split('\n')
    .filter((line) => /^[A-Z][A-Z0-9_]*=/.test(line))
    .map((line) => {
      const at = line.indexOf('=');
      return [line.slice(0, at), line.slice(at + 1)];
    }),
);

describe('.env.example', () => {
  it('lists every setting and nothing else', () => {
    expect(Object.keys(entries).sort()).toEqual(Object.keys(configSchema.shape).sort());
  });

  it('shows each default exactly as the configuration applies it', () => {
    expect(loadConfig(entries)).toEqual(loadConfig({}));
  });
});
