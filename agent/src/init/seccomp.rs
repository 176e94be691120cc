//! The OCI spec's seccomp profile as a classic BPF program, installed by the helper just before
//! it executes the container's program.
//!
//! The program, for x86_64 only (the guest kernel has no 32-bit or x32 ABI):
//! - a foreign architecture, or an x32 call number, kills the process;
//! - then, for each named system call, its rules with argument conditions in profile order,
//!   then its unconditional rule if there is one (as libseccomp orders them): the first rule
//!   whose conditions all hold gives the action; a call without a matching rule, or with none,
//!   gets the default action.
//!
//! Names this agent does not know (newer than the table) are skipped, as runc does, since the
//! kernel would not know them either. Argument conditions compare all 64 bits; for
//! `SCMP_CMP_MASKED_EQ`, `value` is the mask and `valueTwo` the value, as in runc.

use std::collections::BTreeMap;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};

use super::syscalls;

/// A classic BPF instruction (struct sock_filter).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JMP_JA: u16 = 0x05; // BPF_JMP | BPF_JA
const JMP_JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JMP_JGT: u16 = 0x25;
const JMP_JGE: u16 = 0x35;
const ALU_AND: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Offsets in struct seccomp_data.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const fn off_arg(i: usize, high: bool) -> u32 {
    16 + 8 * i as u32 + if high { 4 } else { 0 }
}

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
/// The kernel's limit on a filter's length.
const MAX_INSNS: usize = 4096;

/// A compiled filter and the flags to install it with.
pub struct Filter {
    pub program: Vec<Insn>,
    flags: u32,
}

/// A jump target while the program is built.
#[derive(Clone, Copy)]
enum Target {
    Next,
    /// The instruction right after the current rule (the next rule).
    RuleEnd,
    /// `n` instructions after this one.
    Skip(u8),
}

struct Pending {
    insn: Insn,
    jt: Target,
    jf: Target,
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, String> {
    const EPERM: u32 = 1;
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | (errno.unwrap_or(EPERM) & 0xffff),
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | (errno.unwrap_or(EPERM) & 0xffff),
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp: SCMP_ACT_NOTIFY is not supported".into())
        }
    })
}

/// One system call's rules: those with argument conditions in profile order (each with its
/// action), and the action of its unconditional rule.
#[derive(Default)]
struct Rules {
    conditional: Vec<(Vec<LinuxSeccompArg>, u32)>,
    unconditional: Option<u32>,
}

/// Compile the profile.
pub fn compile(profile: &LinuxSeccomp) -> Result<Filter, String> {
    let archs = profile.architectures().clone().unwrap_or_default();
    let native = archs.is_empty()
        || archs.iter().any(|a| matches!(a, Arch::ScmpArchX86_64 | Arch::ScmpArchNative));
    if !native {
        return Err(format!("seccomp: the profile's architectures {archs:?} leave out x86_64"));
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut calls: BTreeMap<u32, Rules> = BTreeMap::new();
    for rule in profile.syscalls().iter().flatten() {
        let ret = action(rule.action(), rule.errno_ret())?;
        let args = rule.args().clone().unwrap_or_default();
        if let Some(a) = args.iter().find(|a| a.index() > 5) {
            return Err(format!("seccomp: argument index {} (0 to 5)", a.index()));
        }
        for name in rule.names() {
            // Names of other architectures (Docker's profile lists i386 ones) are skipped
            // silently, as libseccomp does for runc: this runs in the container's helper,
            // whose stderr is the container's.
            let Some(nr) = syscalls::number(name) else { continue };
            let entry = calls.entry(nr).or_default();
            if args.is_empty() {
                entry.unconditional.get_or_insert(ret);
            } else {
                entry.conditional.push((args.clone(), ret));
            }
        }
    }

    let mut prog = vec![
        Insn { code: LD_W_ABS, jt: 0, jf: 0, k: OFF_ARCH },
        Insn { code: JMP_JEQ, jt: 1, jf: 0, k: AUDIT_ARCH_X86_64 },
        Insn { code: RET_K, jt: 0, jf: 0, k: RET_KILL_PROCESS },
        Insn { code: LD_W_ABS, jt: 0, jf: 0, k: OFF_NR },
        Insn { code: JMP_JGE, jt: 0, jf: 1, k: X32_SYSCALL_BIT },
        Insn { code: RET_K, jt: 0, jf: 0, k: RET_KILL_PROCESS },
    ];
    for (nr, rules) in &calls {
        let mut body = Vec::new();
        for (args, ret) in &rules.conditional {
            body.extend(rule(args, *ret)?);
        }
        body.push(Insn { code: RET_K, jt: 0, jf: 0, k: rules.unconditional.unwrap_or(default) });
        // Not this call: jump over its rules (a JA, whose offset is 32 bits).
        prog.push(Insn { code: LD_W_ABS, jt: 0, jf: 0, k: OFF_NR });
        prog.push(Insn { code: JMP_JEQ, jt: 1, jf: 0, k: *nr });
        prog.push(Insn { code: JMP_JA, jt: 0, jf: 0, k: body.len() as u32 });
        prog.extend(body);
    }
    prog.push(Insn { code: RET_K, jt: 0, jf: 0, k: default });
    if prog.len() > MAX_INSNS {
        return Err(format!(
            "seccomp: the profile needs {} BPF instructions (at most {MAX_INSNS})",
            prog.len()
        ));
    }
    let mut flags = 0;
    for f in profile.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // Single-threaded helper: nothing to synchronize.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 0,
        } as u32;
    }
    Ok(Filter { program: prog, flags })
}

/// One rule: every argument condition, then the action; a failed condition jumps past it.
fn rule(args: &[LinuxSeccompArg], ret: u32) -> Result<Vec<Insn>, String> {
    let mut pending = Vec::new();
    for a in args {
        condition(a, &mut pending)?;
    }
    pending.push(Pending {
        insn: Insn { code: RET_K, jt: 0, jf: 0, k: ret },
        jt: Target::Next,
        jf: Target::Next,
    });
    let len = pending.len();
    pending
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let resolve = |t: Target| -> Result<u8, String> {
                let n = match t {
                    Target::Next => 0,
                    Target::Skip(n) => n as usize,
                    Target::RuleEnd => len - i - 1,
                };
                u8::try_from(n).map_err(|_| "seccomp: a rule is too long".to_string())
            };
            Ok(Insn { jt: resolve(p.jt)?, jf: resolve(p.jf)?, ..p.insn })
        })
        .collect()
}

/// The instructions for one 64-bit argument condition; falling through means it holds.
fn condition(a: &LinuxSeccompArg, out: &mut Vec<Pending>) -> Result<(), String> {
    use LinuxSeccompOperator as Op;
    use Target::{Next, RuleEnd as Fail, Skip};
    let i = a.index();
    let ld = |high| Pending {
        insn: Insn { code: LD_W_ABS, jt: 0, jf: 0, k: off_arg(i, high) },
        jt: Next,
        jf: Next,
    };
    let j =
        |code, k: u64, jt, jf| Pending { insn: Insn { code, jt: 0, jf: 0, k: k as u32 }, jt, jf };
    let (v, hi, lo) = (a.value(), a.value() >> 32, a.value() & 0xffff_ffff);
    match a.op() {
        Op::ScmpCmpEq => out.extend([
            ld(true),
            j(JMP_JEQ, hi, Next, Fail),
            ld(false),
            j(JMP_JEQ, lo, Next, Fail),
        ]),
        Op::ScmpCmpMaskedEq => {
            let want = a.value_two().unwrap_or(0);
            let and = |m: u64| Pending {
                insn: Insn { code: ALU_AND, jt: 0, jf: 0, k: m as u32 },
                jt: Next,
                jf: Next,
            };
            out.extend([
                ld(true),
                and(v >> 32),
                j(JMP_JEQ, want >> 32, Next, Fail),
                ld(false),
                and(v & 0xffff_ffff),
                j(JMP_JEQ, want & 0xffff_ffff, Next, Fail),
            ])
        }
        // High words differ: holds (skip the low-word test); else the low words decide.
        Op::ScmpCmpNe => out.extend([
            ld(true),
            j(JMP_JEQ, hi, Next, Skip(2)),
            ld(false),
            j(JMP_JEQ, lo, Fail, Next),
        ]),
        // Unsigned: the high words decide unless equal, then the low words.
        Op::ScmpCmpGt | Op::ScmpCmpGe => {
            let low = if a.op() == Op::ScmpCmpGt { JMP_JGT } else { JMP_JGE };
            out.extend([
                ld(true),
                j(JMP_JGT, hi, Skip(3), Next),
                j(JMP_JEQ, hi, Next, Fail),
                ld(false),
                j(low, lo, Next, Fail),
            ])
        }
        Op::ScmpCmpLt | Op::ScmpCmpLe => {
            // a < v: not (a >= v); a <= v: not (a > v).
            let low = if a.op() == Op::ScmpCmpLt { JMP_JGE } else { JMP_JGT };
            out.extend([
                ld(true),
                j(JMP_JGT, hi, Fail, Next),
                j(JMP_JEQ, hi, Next, Skip(2)),
                ld(false),
                j(low, lo, Fail, Next),
            ])
        }
    }
    Ok(())
}

/// Install the filter on this process (no_new_privs set, or CAP_SYS_ADMIN).
pub fn install(f: &Filter) -> Result<(), String> {
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const Insn,
    }
    let prog = SockFprog { len: f.program.len() as u16, filter: f.program.as_ptr() };
    // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads the sock_fprog and its `len`
    // instructions, which live in `f` for the duration of the call.
    let r =
        unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, f.flags, &prog) };
    if r < 0 {
        return Err(format!("seccomp: installing the filter: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run the program on a system call the way the kernel's classic BPF interpreter would
    /// (for the instructions compile() emits).
    fn run(prog: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let word = |off: u32| -> u32 {
            match off {
                OFF_NR => nr,
                OFF_ARCH => arch,
                o => {
                    let (i, high) = (((o - 16) / 8) as usize, (o - 16) % 8 == 4);
                    if high {
                        (args[i] >> 32) as u32
                    } else {
                        args[i] as u32
                    }
                }
            }
        };
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let insn = prog[pc];
            pc += 1;
            match insn.code {
                LD_W_ABS => a = word(insn.k),
                ALU_AND => a &= insn.k,
                JMP_JA => pc += insn.k as usize,
                JMP_JEQ | JMP_JGT | JMP_JGE => {
                    let taken = match insn.code {
                        JMP_JEQ => a == insn.k,
                        JMP_JGT => a > insn.k,
                        _ => a >= insn.k,
                    };
                    pc += if taken { insn.jt } else { insn.jf } as usize;
                }
                RET_K => return insn.k,
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
    }

    fn profile(json: &str) -> Filter {
        compile(&serde_json::from_str(json).unwrap()).unwrap()
    }

    const MKDIR: u32 = libc::SYS_mkdir as u32;
    const PERSONALITY: u32 = libc::SYS_personality as u32;

    #[test]
    fn actions_by_name_and_defaults() {
        let f = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,
                "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
                "syscalls":[{"names":["read","write","no_such_call"],"action":"SCMP_ACT_ALLOW"},
                            {"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":13},
                            {"names":["kill"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
        );
        let x86_64 = AUDIT_ARCH_X86_64;
        assert_eq!(run(&f.program, x86_64, libc::SYS_read as u32, [0; 6]), RET_ALLOW);
        assert_eq!(run(&f.program, x86_64, libc::SYS_write as u32, [0; 6]), RET_ALLOW);
        assert_eq!(run(&f.program, x86_64, MKDIR, [0; 6]), RET_ERRNO | 13);
        assert_eq!(run(&f.program, x86_64, libc::SYS_kill as u32, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(run(&f.program, x86_64, libc::SYS_openat as u32, [0; 6]), RET_ERRNO | 38);
        // i386 and x32 calls never get through.
        assert_eq!(run(&f.program, 0x4000_0003, 0, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(run(&f.program, x86_64, X32_SYSCALL_BIT | 1, [0; 6]), RET_KILL_PROCESS);
    }

    #[test]
    fn argument_conditions_compare_64_bits() {
        let f = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["personality"],"action":"SCMP_ACT_ERRNO",
                 "args":[{"index":0,"value":4294967297,"op":"SCMP_CMP_EQ"}]},
                {"names":["personality"],"action":"SCMP_ACT_LOG",
                 "args":[{"index":1,"value":4294967296,"op":"SCMP_CMP_GT"},
                         {"index":2,"value":4294967296,"op":"SCMP_CMP_LE"}]},
                {"names":["personality"],"action":"SCMP_ACT_TRAP"},
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO",
                 "args":[{"index":1,"value":2048,"valueTwo":2048,"op":"SCMP_CMP_MASKED_EQ"}]},
                {"names":["mkdir"],"action":"SCMP_ACT_KILL",
                 "args":[{"index":1,"value":511,"op":"SCMP_CMP_NE"},
                         {"index":1,"value":16,"op":"SCMP_CMP_GE"},
                         {"index":1,"value":64,"op":"SCMP_CMP_LT"}]}]}"#,
        );
        let p = |args| run(&f.program, AUDIT_ARCH_X86_64, PERSONALITY, args);
        // EQ on both halves: the high word alone or the low word alone is not enough.
        assert_eq!(p([(1 << 32) | 1, 0, 0, 0, 0, 0]), RET_ERRNO | 1);
        assert_eq!(p([1, 0, 0, 0, 0, 0]), RET_TRAP);
        assert_eq!(p([1 << 32, 0, 0, 0, 0, 0]), RET_TRAP);
        // GT and LE across the word boundary; both must hold.
        assert_eq!(p([0, (1 << 32) + 1, 1 << 32, 0, 0, 0]), RET_LOG);
        assert_eq!(p([0, 1 << 32, 1 << 32, 0, 0, 0]), RET_TRAP);
        assert_eq!(p([0, 2 << 32, (1 << 32) + 1, 0, 0, 0]), RET_TRAP);
        assert_eq!(p([0, 2 << 32, 0xffff_ffff, 0, 0, 0]), RET_LOG);
        let m = |mode: u64| run(&f.program, AUDIT_ARCH_X86_64, MKDIR, [0, mode, 0, 0, 0, 0]);
        // MASKED_EQ: the setuid bit (0o4000), whatever else is set.
        assert_eq!(m(0o4755), RET_ERRNO | 1);
        assert_eq!(m(0o2755), RET_ALLOW);
        // NE, GE and LT together: 16 <= mode < 64 and not 511.
        assert_eq!(m(16), RET_KILL_THREAD);
        assert_eq!(m(63), RET_KILL_THREAD);
        assert_eq!(m(64), RET_ALLOW);
        assert_eq!(m(15), RET_ALLOW);
        assert_eq!(m((1 << 32) | 20), RET_ALLOW);
    }

    #[test]
    fn unsupported_profiles_are_errors() {
        let bad = |json: &str| compile(&serde_json::from_str(json).unwrap()).err().unwrap();
        assert!(bad(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#).contains("NOTIFY"));
        assert!(bad(r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#)
            .contains("x86_64"));
        let idx = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],
            "action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#;
        assert!(bad(idx).contains("index 6"));
    }
}
