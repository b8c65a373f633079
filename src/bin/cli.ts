// meterbox CLI: `meterbox <command> [--flags]`. Commands are registered in COMMANDS below; each
// lives next to the code it drives and receives a Context.
import { parseArgs } from 'node:util';
import { adminCommands } from '../admin/cli.js';
import { correctionCommands } from '../admin/corrections-cli.js';
import { organizationCommands } from '../admin/organizations-cli.js';
import { type Context, createContext } from '../context.js';
import { configOrExit, exitOnFatal } from './process.js';

export interface CliCommand {
  summary: string;
  usage: string;
  /** Returns the process exit code. */
  run(
    ctx: Context,
    args: { values: Record<string, string | boolean | undefined>; positionals: string[] },
  ): Promise<number>;
  options?: Record<string, { type: 'string' | 'boolean'; short?: string }>;
}

const COMMANDS: Record<string, CliCommand> = {
  ...organizationCommands,
  ...adminCommands,
  ...correctionCommands,
};

function help(): string {
  const lines = ['usage: meterbox <command> [options]', '', 'commands:'];
  for (const [name, command] of Object.entries(COMMANDS))
    lines.push(`  ${name.padEnd(18)} ${command.summary}`);
  return lines.join('\n');
}

const argv = process.argv.slice(2);
const name = [argv.slice(0, 2).join(' '), argv[0] ?? ''].find((candidate) => candidate in COMMANDS);
if (!name) {
  console.error(help());
  process.exit(argv.length === 0 || argv[0] === 'help' || argv[0] === '--help' ? 0 : 2);
}
const command = COMMANDS[name]!;
let parsed: ReturnType<typeof parseArgs>;
try {
  parsed = parseArgs({
    args: argv.slice(name.split(' ').length),
    options: command.options ?? {},
    allowPositionals: true,
  });
} catch (err) {
  console.error(`${(err as Error).message}\nusage: meterbox ${command.usage}`);
  process.exit(2);
}
const config = configOrExit({ needDatabase: true });
try {
  const ctx = await createContext(config, { applicationName: 'meterbox-cli' });
  let code = 1;
  try {
    await ctx.boss.start();
    code = await command.run(ctx, {
      values: parsed.values as Record<string, string | boolean | undefined>,
      positionals: parsed.positionals,
    });
  } finally {
    await ctx.close();
  }
  process.exit(code);
} catch (err) {
  exitOnFatal(err);
}
