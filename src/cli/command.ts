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
  options?: Record<string, { type: 'string' | 'boolean'; short?: string }>;
}
