import FoundationEssentials
import Glibc
import QCowImage

/// A byte count as qemu-img prints it (util/cutils.c `size_to_str`): three significant digits, the
/// unit a power of 1024 chosen so the number stays below 1000 — "999 B", "0.977 KiB", "1.5 GiB".
///
/// qemu-img's `%0.3g` prints "1e+03 KiB" for 1023999 bytes (999.999 rounds up to four digits);
/// here such a value moves to the next unit ("0.977 MiB"), so the text never uses exponents.
/// `info`, `list`, `bitmap list`, the one-line summaries and the progress bar all print sizes
/// through this one function.
func humanSize(_ bytes: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    // qemu-img's choice: the next unit once the value reaches 1000 of the current one.
    var unit = 0
    while unit < units.count - 1 && Double(bytes) >= 1000 * pow(1024, Double(unit)) { unit += 1 }
    while true {
        // Below 1000 `%0.3g` prints plain digits; an exponent means the value rounded up to 1000.
        let text = String(printf: "%0.3g", Double(bytes) / pow(1024, Double(unit)))
        if text.contains("e") && unit < units.count - 1 {
            unit += 1
            continue
        }
        return "\(text) \(units[unit])"
    }
}
