//! Tiny test guests: a few dozen bytes of x86-64 machine code, assembled here and wrapped in an
//! ELF64 executable that the VMM loads like a vmlinux. They run on any KVM, including this
//! machine's PVM, which cannot run a Linux guest, and exercise the VMM's long-mode entry, its
//! port-I/O and MMIO exits and its exits on reset and triple fault.

use std::path::{Path, PathBuf};

/// Where the guest's code is loaded and entered (above the 1 MiB the VMM requires).
pub const LOAD_ADDR: u64 = 0x20_0000;

/// COM1's data register.
pub const COM1: u16 = 0x3f8;

/// The encodings the tests need, appended one instruction at a time.
#[derive(Default, Clone)]
pub struct Asm {
    code: Vec<u8>,
}

/// A forward jump whose target is set later with [`Asm::bind`].
#[must_use]
pub struct Label(usize);

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    fn emit(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    /// `mov dx, port`
    pub fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.emit(&[0x66, 0xba]).emit(&port.to_le_bytes())
    }

    /// `mov al, v`
    pub fn mov_al(&mut self, v: u8) -> &mut Self {
        self.emit(&[0xb0, v])
    }

    /// `mov eax, v`
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.emit(&[0xb8]).emit(&v.to_le_bytes())
    }

    /// `mov ecx, v`
    pub fn mov_ecx(&mut self, v: u32) -> &mut Self {
        self.emit(&[0xb9]).emit(&v.to_le_bytes())
    }

    /// `mov rbx, v`
    pub fn mov_rbx(&mut self, v: u64) -> &mut Self {
        self.emit(&[0x48, 0xbb]).emit(&v.to_le_bytes())
    }

    /// `out dx, al`
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.emit(&[0xee])
    }

    /// `out port, al` for an 8-bit port.
    pub fn out_imm_al(&mut self, port: u8) -> &mut Self {
        self.emit(&[0xe6, port])
    }

    /// Write `text` to the port in `dx`, one byte at a time.
    pub fn print(&mut self, text: &[u8]) -> &mut Self {
        for &b in text {
            self.mov_al(b).out_dx_al();
        }
        self
    }

    /// `rdmsr` (ecx selects, result in edx:eax)
    pub fn rdmsr(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x32])
    }

    /// `mov rax, cr0`
    pub fn mov_rax_cr0(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x20, 0xc0])
    }

    /// `and eax, v`
    pub fn and_eax(&mut self, v: u32) -> &mut Self {
        self.emit(&[0x25]).emit(&v.to_le_bytes())
    }

    /// `add al, v`
    pub fn add_al(&mut self, v: u8) -> &mut Self {
        self.emit(&[0x04, v])
    }

    /// `cmp eax, v`
    pub fn cmp_eax(&mut self, v: u32) -> &mut Self {
        self.emit(&[0x3d]).emit(&v.to_le_bytes())
    }

    /// `cmp rsi, v` (sign-extended 32-bit immediate)
    pub fn cmp_rsi(&mut self, v: u32) -> &mut Self {
        self.emit(&[0x48, 0x81, 0xfe]).emit(&v.to_le_bytes())
    }

    /// `add rbx, v` (sign-extended 32-bit immediate)
    pub fn add_rbx(&mut self, v: u32) -> &mut Self {
        self.emit(&[0x48, 0x81, 0xc3]).emit(&v.to_le_bytes())
    }

    /// `cmp rbx, v` (sign-extended 32-bit immediate)
    pub fn cmp_rbx(&mut self, v: u32) -> &mut Self {
        self.emit(&[0x48, 0x81, 0xfb]).emit(&v.to_le_bytes())
    }

    /// `mov ebx, [rsi + disp]`
    pub fn mov_ebx_rsi_disp(&mut self, disp: u32) -> &mut Self {
        self.emit(&[0x8b, 0x9e]).emit(&disp.to_le_bytes())
    }

    /// `mov al, [rbx]`
    pub fn mov_al_at_rbx(&mut self) -> &mut Self {
        self.emit(&[0x8a, 0x03])
    }

    /// `mov eax, [rbx + disp8]`
    pub fn mov_eax_at_rbx(&mut self, disp: u8) -> &mut Self {
        self.emit(&[0x8b, 0x43, disp])
    }

    /// `mov dword [rbx + disp8], v`
    pub fn mov_at_rbx_dword(&mut self, disp: u8, v: u32) -> &mut Self {
        self.emit(&[0xc7, 0x43, disp]).emit(&v.to_le_bytes())
    }

    /// `mov byte [rbx], v`
    pub fn mov_at_rbx_byte(&mut self, v: u8) -> &mut Self {
        self.emit(&[0xc6, 0x03, v])
    }

    /// `test al, al`
    pub fn test_al(&mut self) -> &mut Self {
        self.emit(&[0x84, 0xc0])
    }

    /// `inc rbx`
    pub fn inc_rbx(&mut self) -> &mut Self {
        self.emit(&[0x48, 0xff, 0xc3])
    }

    /// `shr eax, n`
    pub fn shr_eax(&mut self, n: u8) -> &mut Self {
        self.emit(&[0xc1, 0xe8, n])
    }

    /// `push 0` twice and `lidt [rsp]`: an IDT with limit 0, so any exception triple-faults.
    pub fn lidt_empty(&mut self) -> &mut Self {
        self.emit(&[0x6a, 0x00, 0x6a, 0x00, 0x0f, 0x01, 0x1c, 0x24])
    }

    /// `ud2`: an invalid-opcode exception.
    pub fn ud2(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x0b])
    }

    /// `hlt; jmp` back to the `hlt`.
    pub fn halt_forever(&mut self) -> &mut Self {
        self.emit(&[0xf4, 0xeb, 0xfd])
    }

    /// Pulse the CPU reset line through the i8042 (what Linux's `reboot=k` does), then halt.
    pub fn i8042_reset(&mut self) -> &mut Self {
        self.mov_al(0xfe).out_imm_al(0x64).halt_forever()
    }

    /// The current offset, as a backward jump target.
    pub fn here(&self) -> usize {
        self.code.len()
    }

    /// `jmp` back to `target`.
    pub fn jmp_back(&mut self, target: usize) -> &mut Self {
        let rel = target as isize - (self.code.len() as isize + 2);
        self.emit(&[0xeb, i8::try_from(rel).expect("short jump") as u8])
    }

    fn jcc_forward(&mut self, opcode: u8) -> Label {
        self.emit(&[opcode, 0]);
        Label(self.code.len())
    }

    /// `jz` to a label bound later.
    pub fn jz(&mut self) -> Label {
        self.jcc_forward(0x74)
    }

    /// `jnz` to a label bound later.
    pub fn jnz(&mut self) -> Label {
        self.jcc_forward(0x75)
    }

    /// Make `label`'s jump land here.
    pub fn bind(&mut self, label: Label) -> &mut Self {
        let rel = self.code.len() - label.0;
        self.code[label.0 - 1] = u8::try_from(rel).expect("short jump");
        self
    }

    /// The machine code.
    pub fn code(&self) -> &[u8] {
        &self.code
    }
}

/// An ELF64 executable with one loadable segment holding `code` at [`LOAD_ADDR`], entered at
/// its first byte.
pub fn elf_image(code: &[u8]) -> Vec<u8> {
    const EHDR_SIZE: u16 = 64;
    const PHDR_SIZE: u16 = 56;
    const CODE_OFFSET: u64 = 0x1000;
    let mut elf = Vec::with_capacity(CODE_OFFSET as usize + code.len());
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    elf.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&EHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&PHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes());
    elf.extend_from_slice(&[0; 4]);
    // PT_LOAD, R+X
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&CODE_OFFSET.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(code);
    elf
}

/// A directory for one test's files, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory named after `name` and this process (and numbered, so that tests
    /// running in parallel can use the same name).
    pub fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("husk-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test directory");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Write `bytes` to `name` inside it and return the path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_are_patched() {
        let mut asm = Asm::new();
        let l = asm.jz();
        asm.ud2();
        asm.bind(l);
        let top = asm.here();
        asm.jmp_back(top);
        assert_eq!(asm.code(), &[0x74, 0x02, 0x0f, 0x0b, 0xeb, 0xfe]);
    }

    #[test]
    fn elf_places_code_at_its_offset() {
        let elf = elf_image(&[0x90, 0xf4]);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(&elf[0x1000..], &[0x90, 0xf4]);
        assert_eq!(u64::from_le_bytes(elf[24..32].try_into().unwrap()), LOAD_ADDR);
    }
}
