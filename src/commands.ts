// Every `meterbox <command>`: the registry, the help texts, and the parse of a command line into
// "print this and exit" or "run this command with these flags" (no database needed to decide).
// A composer: it lists the features' commands; the command type and helpers sit below in src/cli/.
import { parseArgs } from 'node:util';
import { citusCommands } from './admin/citus-cli.js';
import { adminCommands } from './admin/cli.js';
import { correctionCommands } from './admin/corrections-cli.js';
import { destinationCommands } from './admin/destinations-cli.js';
import { organizationCommands } from './admin/organizations-cli.js';
import { stripeCommands } from './billing/stripe-cli.js';
import type { CliCommand } from './cli/command.js';
import { replicationCommands } from './metering/replication-report.js';

export const COMMANDS: Readonly<Record<string, CliCommand>> = {
  ...organizationCommands,
  ...adminCommands,
  ...correctionCommands,
  ...stripeCommands,
  ...destinationCommands,
  ...citusCommands,
  ...replicationCommands,
};

export function generalHelp(): string {
  const lines = ['usage: meterbox <command> [options]', '', 'commands:'];
  for (const [name, command] of Object.entries(COMMANDS))
    lines.push(`  ${name.padEnd(18)} ${command.summary}`);
  lines.push('', 'meterbox <command> --help prints the flags of one command.');
  return lines.join('\n');
}

export function commandHelp(name: string): string {
  const command = COMMANDS[name];
  if (!command) return generalHelp();
  const lines = [`usage: meterbox ${command.usage}`, '', command.summary];
  const options = Object.entries(command.options ?? {});
  if (options.length > 0) {
    lines.push('', 'options:');
    for (const [flag, spec] of options) {
      const short = spec.short ? `-${spec.short}, ` : '';
      lines.push(`  ${short}--${flag}${spec.type === 'string' ? ' <value>' : ''}`);
    }
  }
  lines.push('  -h, --help        print this help');
  return lines.join('\n');
}

export type CommandLine =
  /** Print `text` (stdout for help, stderr for a usage error) and exit with `code`. */
  | { kind: 'exit'; code: number; text: string; stream: 'stdout' | 'stderr' }
  | {
      kind: 'run';
      name: string;
      command: CliCommand;
      values: Record<string, string | boolean | undefined>;
      positionals: string[];
    };

export function parseCommandLine(argv: readonly string[]): CommandLine {
  if (argv.length === 0 || argv[0] === 'help' || argv[0] === '--help' || argv[0] === '-h') {
    const topic = argv[0] === 'help' ? argv.slice(1).join(' ') : '';
    return { kind: 'exit', code: 0, text: topic ? commandHelp(topic) : generalHelp(), stream: 'stdout' };
  }
  const name = [argv.slice(0, 2).join(' '), argv[0] ?? ''].find((candidate) => candidate in COMMANDS);
  if (!name) {
    return {
      kind: 'exit',
      code: 2,
      text: `meterbox: unknown command '${argv[0]}'\n\n${generalHelp()}`,
      stream: 'stderr',
    };
  }
  const command = COMMANDS[name]!;
  const rest = argv.slice(name.split(' ').length);
  if (rest.includes('--help') || rest.includes('-h')) {
    return { kind: 'exit', code: 0, text: commandHelp(name), stream: 'stdout' };
  }
  try {
    const parsed = parseArgs({ args: [...rest], options: command.options ?? {}, allowPositionals: true });
    return {
      kind: 'run',
      name,
      command,
      values: parsed.values as Record<string, string | boolean | undefined>,
      positionals: parsed.positionals,
    };
  } catch (err) {
    return {
      kind: 'exit',
      code: 2,
      text: `meterbox: ${(err as Error).message}\nusage: meterbox ${command.usage}\n(meterbox ${name} --help for every flag)`,
      stream: 'stderr',
    };
  }
}
