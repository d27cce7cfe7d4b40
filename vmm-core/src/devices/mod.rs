//! Devices the VMM emulates itself on its vCPU threads: the COM1 serial port and the two
//! ports that end the VM (i8042 reset, debug exit). virtio-mmio devices come with the
//! worker issues.

pub mod serial;
pub mod virtio_mmio;

use crate::layout::{
    ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, DEBUG_EXIT_PORT,
    SERIAL_PORT_BASE, SERIAL_PORT_COUNT,
};

/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command "pulse the reset line".
pub const I8042_CMD_RESET: u8 = 0xfe;

/// Sleep control register: SLP_EN and the SLP_TYP field (ACPI 6.5, 4.8.3.7).
const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7 << SLEEP_TYPE_SHIFT;

/// What a port write asks the VMM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioAction {
    /// Keep running.
    Continue,
    /// The guest asked to reset (i8042 pulse): bulkhead ends the VM with status 0.
    Reset,
    /// The guest entered ACPI S5 (soft off) through the sleep control register.
    PowerOff,
    /// The guest wrote `code` to the debug-exit port.
    DebugExit(u32),
}

/// Port I/O dispatch for the legacy devices.
#[derive(Debug)]
pub struct LegacyPio {
    serial: serial::SerialPort,
}

impl LegacyPio {
    pub fn new(serial: serial::SerialPort) -> Self {
        LegacyPio { serial }
    }

    /// Handles a guest `out`.
    pub fn write(&self, port: u16, data: &[u8]) -> PioAction {
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + u16::from(SERIAL_PORT_COUNT))
                .contains(&p) =>
            {
                if let Some(&byte) = data.first() {
                    self.serial.write((p - SERIAL_PORT_BASE) as u8, byte);
                }
                PioAction::Continue
            }
            I8042_COMMAND_PORT if data.first() == Some(&I8042_CMD_RESET) => PioAction::Reset,
            ACPI_SLEEP_CONTROL_PORT => match data.first() {
                Some(&v)
                    if v & SLEEP_ENABLE != 0
                        && (v & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT == ACPI_S5_SLEEP_TYPE =>
                {
                    PioAction::PowerOff
                }
                // Other sleep states are not offered (no `_S1_`.. `_S4_` in the DSDT).
                _ => PioAction::Continue,
            },
            DEBUG_EXIT_PORT => {
                let mut value = [0u8; 4];
                let n = data.len().min(4);
                value[..n].copy_from_slice(&data[..n]);
                PioAction::DebugExit(u32::from_le_bytes(value))
            }
            _ => PioAction::Continue,
        }
    }

    /// Handles a guest `in`, filling `data`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + u16::from(SERIAL_PORT_COUNT))
                .contains(&p) =>
            {
                self.serial.read((p - SERIAL_PORT_BASE) as u8)
            }
            // Never asleep, so never woken: WAK_STS stays clear.
            ACPI_SLEEP_STATUS_PORT | ACPI_SLEEP_CONTROL_PORT => 0,
            // No keyboard: an i8042 with empty buffers and no pending command.
            I8042_COMMAND_PORT | I8042_DATA_PORT => 0,
            // Nothing decodes other ports: the bus floats high.
            _ => 0xff,
        };
        data.fill(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pio() -> LegacyPio {
        LegacyPio::new(serial::SerialPort::new(Box::new(std::io::sink())).unwrap())
    }

    #[test]
    fn debug_exit_takes_the_written_value() {
        assert_eq!(
            pio().write(DEBUG_EXIT_PORT, &[7, 0, 0, 0]),
            PioAction::DebugExit(7)
        );
        assert_eq!(pio().write(DEBUG_EXIT_PORT, &[3]), PioAction::DebugExit(3));
    }

    #[test]
    fn only_the_reset_command_resets() {
        assert_eq!(pio().write(I8042_COMMAND_PORT, &[0xfe]), PioAction::Reset);
        assert_eq!(
            pio().write(I8042_COMMAND_PORT, &[0xad]),
            PioAction::Continue
        );
    }

    #[test]
    fn s5_through_the_sleep_control_register_powers_off() {
        assert_eq!(
            pio().write(ACPI_SLEEP_CONTROL_PORT, &[0x34]),
            PioAction::PowerOff
        );
        // SLP_EN without the S5 type, or the type without SLP_EN: nothing.
        assert_eq!(
            pio().write(ACPI_SLEEP_CONTROL_PORT, &[0x24]),
            PioAction::Continue
        );
        assert_eq!(
            pio().write(ACPI_SLEEP_CONTROL_PORT, &[0x14]),
            PioAction::Continue
        );
    }

    #[test]
    fn unknown_ports_read_all_ones() {
        let mut data = [0u8; 2];
        pio().read(0x1234, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }
}
