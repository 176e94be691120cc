//! Legacy PC devices on the port-I/O and MMIO buses: COM1 serial (with its bounded file output),
//! the i8042 controller (only for its reset line) and the boot timer.

pub mod boot_timer;
pub mod console_file;
pub mod i8042;
pub mod serial;
pub mod trigger;

pub use boot_timer::BootTimer;
pub use console_file::ConsoleFile;
pub use i8042::I8042;
pub use serial::{SerialConsole, SerialInput, SerialSnapshot};
pub use trigger::EventFdTrigger;
