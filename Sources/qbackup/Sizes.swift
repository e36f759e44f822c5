import ArgumentParser
import BitmapStore
import QCowImage

/// Parses "64K", "1G", "512" (qemu-img's size suffixes, powers of 1024). A value that is
/// not a size is a usage error (exit 2), so size options take it as `transform:`.
func parseSize(_ text: String) throws -> UInt64 {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60]
    var digits = text.uppercased()
    var scale: UInt64 = 1
    if digits.hasSuffix("B") && digits.count > 1 { digits.removeLast() }
    if let last = digits.last, let unit = units[last] {
        scale = unit
        digits.removeLast()
    }
    guard let value = UInt64(digits) else {
        throw ValidationError(text.hasPrefix("-") ? "'\(text)' is not a size: sizes are not negative"
                                                  : "'\(text)' is not a size (e.g. 64K, 10G)")
    }
    let (result, overflow) = value.multipliedReportingOverflow(by: scale)
    guard !overflow else { throw ValidationError("'\(text)' is too large") }
    return result
}

/// A `--cluster-size`: a size QEMU accepts as a qcow2 cluster size (512 B to 2 MiB, a power of two).
func parseClusterSize(_ text: String) throws -> Int {
    let bytes = try parseSize(text)
    guard bytes <= UInt64(Int.max) else { throw ValidationError("'\(text)' is too large for a cluster size") }
    do {
        try QCowCreator.validateClusterSize(Int(bytes))
    } catch let error as QCowError {
        throw ValidationError(error.message)
    }
    return Int(bytes)
}

/// A `--granularity`: bytes per bit of a bitmap, a power of two from 512 B to 2 GiB.
func parseGranularity(_ text: String) throws -> UInt64 {
    let bytes = try parseSize(text)
    do {
        try BitmapCatalog.validateGranularity(bytes)
    } catch let error as BitmapError {
        throw ValidationError(error.message)
    }
    return bytes
}

/// "-1", "-5G": what a user meant as a negative size, which the parser takes for an option.
func isNegativeNumber(_ argument: String) -> Bool {
    argument.count > 1 && argument.hasPrefix("-") && argument.dropFirst().first?.isNumber == true
}
