#!/usr/bin/env node
// The package's command: the emulator is a development tool shipped as TypeScript source, never
// built, so its command loads tsx before the CLI instead of needing a compile step.
import { register } from 'tsx/esm/api';

register();
await import('../src/cli.ts');
