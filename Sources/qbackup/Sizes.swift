import ArgumentParser

/// Parses "64K", "1G", "512" (qemu-img's size suffixes, powers of 1024).
func parseSize(_ text: String) throws -> UInt64 {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60]
    var digits = text.uppercased()
    var scale: UInt64 = 1
    if digits.hasSuffix("B") && digits.count > 1 { digits.removeLast() }
    if let last = digits.last, let unit = units[last] {
        scale = unit
        digits.removeLast()
    }
    guard let value = UInt64(digits) else { throw ValidationError("'\(text)' is not a size (e.g. 64K, 10G)") }
    let (result, overflow) = value.multipliedReportingOverflow(by: scale)
    guard !overflow else { throw ValidationError("'\(text)' is too large") }
    return result
}
