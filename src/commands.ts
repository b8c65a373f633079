// Every `meterbox <command>`: the registry, the help texts, and the parse of a command line into
// "print this and exit" or "run this command with these flags" (no database needed to decide).
// A composer: it lists the features' commands; the command type and helpers sit below in src/cli/.
import { parseArgs } from 'node:util';
import { alertCommands } from './admin/alerts-cli.js';
import { citusCommands } from './admin/citus-cli.js';
import { adminCommands } from './admin/cli.js';
import { correctionCommands } from './admin/corrections-cli.js';
import { destinationCommands } from './admin/destinations-cli.js';
import { organizationCommands } from './admin/organizations-cli.js';
import { usageTokenCommands } from './admin/usage-tokens-cli.js';
import { stripeCommands } from './billing/stripe-cli.js';
import type { CliCommand } from './cli/command.js';
import { replicationCommands } from './metering/replication-report.js';
import { walCommands } from './metering/wal-report.js';

export const COMMANDS: Readonly<Record<string, CliCommand>> = {
  ...organizationCommands,
  ...adminCommands,
  ...correctionCommands,
  ...stripeCommands,
  ...destinationCommands,
  ...citusCommands,
  ...replicationCommands,
  ...walCommands,
  ...usageTokenCommands,
  ...alertCommands,
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

/** The commands of a group (`destinations`, `stripe`, `outbox`…): the registry's names starting with it. */
function groupOf(word: string): string[] {
  return Object.keys(COMMANDS).filter((name) => name.startsWith(`${word} `));
}

export function groupHelp(group: string): string {
  const lines = [`usage: meterbox ${group} <command> [options]`, '', 'commands:'];
  for (const name of groupOf(group)) lines.push(`  ${name.padEnd(28)} ${COMMANDS[name]!.summary}`);
  lines.push('', `meterbox ${group} <command> --help prints the flags of one command.`);
  return lines.join('\n');
}

/**
 * `--org` is an alias of `--organization`, the one name every command documents (`--org=<id>` too).
 */
function withAliases(args: readonly string[]): string[] {
  return args.map((arg) =>
    arg === '--org' ? '--organization' : arg.startsWith('--org=') ? `--organization=${arg.slice(6)}` : arg,
  );
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
    const text =
      topic && !(topic in COMMANDS) && groupOf(topic).length > 0 ? groupHelp(topic) : commandHelp(topic);
    return { kind: 'exit', code: 0, text: topic ? text : generalHelp(), stream: 'stdout' };
  }
  const name = [argv.slice(0, 2).join(' '), argv[0] ?? ''].find((candidate) => candidate in COMMANDS);
  if (!name && groupOf(argv[0] ?? '').length > 0) {
    const help = argv.length === 1 || argv[1] === '--help' || argv[1] === '-h';
    return help
      ? { kind: 'exit', code: 0, text: groupHelp(argv[0]!), stream: 'stdout' }
      : {
          kind: 'exit',
          code: 2,
          text: `meterbox: unknown command '${argv.slice(0, 2).join(' ')}'\n\n${groupHelp(argv[0]!)}`,
          stream: 'stderr',
        };
  }
  if (!name) {
    return {
      kind: 'exit',
      code: 2,
      text: `meterbox: unknown command '${argv[0]}'\n\n${generalHelp()}`,
      stream: 'stderr',
    };
  }
  const command = COMMANDS[name]!;
  const rest = withAliases(argv.slice(name.split(' ').length));
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
