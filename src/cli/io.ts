// Shared helpers of the CLI commands: where output goes (so tests capture it), flag reading, usage
// errors (exit code 2) and plain text tables.
import type { ProgressStream } from './progress.js';

/** Flag values as node:util parseArgs returns them. */
export type FlagValues = Record<string, string | boolean | undefined>;

export interface CliIo {
  out: (text: string) => void;
  err: ProgressStream;
}

export const processIo = (): CliIo => ({
  out: (text) => process.stdout.write(`${text}\n`),
  err: process.stderr,
});

export const str = (values: FlagValues, name: string): string | undefined => {
  const v = values[name];
  return typeof v === 'string' && v.trim() !== '' ? v.trim() : undefined;
};

export function usageError(io: CliIo, message: string, usage: string): number {
  io.err.write(`meterbox: ${message}\nusage: meterbox ${usage}\n`);
  return 2;
}

export function zodMessage(error: {
  issues: readonly { path: readonly PropertyKey[]; message: string }[];
}): string {
  return error.issues.map((i) => `${i.path.map(String).join('.') || 'input'}: ${i.message}`).join('; ');
}

/** Plain text table; columns listed in `right` are right-aligned (numbers). */
export function formatTable(
  headers: string[],
  rows: string[][],
  right: ReadonlySet<number> = new Set(),
): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (right.has(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(headers), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}
