// The CLI's command shape, shared by the feature folders that define commands (admin/*-cli.ts) and
// the registry above them (src/commands.ts) that the entry point (bin/cli.ts) dispatches from.
import type { Context } from '../context-type.js';

export interface CliCommand {
  summary: string;
  /** `<command> <flags>` as printed after `usage: meterbox`. */
  usage: string;
  /** Returns the process exit code. */
  run(
    ctx: Context,
    args: { values: Record<string, string | boolean | undefined>; positionals: string[] },
  ): Promise<number>;
  options?: CliOptions;
}

export type CliOptions = Record<string, { type: 'string' | 'boolean'; short?: string }>;

/** A command's flags: each of `values` takes a value (`--organization <id>`), each of `switches` stands alone (`--json`). */
export function flags(values: readonly string[], switches: readonly string[] = []): CliOptions {
  return Object.fromEntries([
    ...values.map((name) => [name, { type: 'string' as const }]),
    ...switches.map((name) => [name, { type: 'boolean' as const }]),
  ]);
}
