//! `husk state`: the container's state as runc prints it.

use crate::cli::GlobalArgs;
use crate::container::Container;

pub fn run(global: &GlobalArgs, id: &str) -> anyhow::Result<()> {
    let container = Container::open(&global.root, id)?;
    let record = container.load()?;
    println!("{}", serde_json::to_string_pretty(&record.to_oci_state())?);
    Ok(())
}
