import BackupChain
import BitmapStore
import FoundationEssentials
import QCowImage

/// DESIGN "Command line": with `--output json`, a command whose JSON is an object prints
/// exactly one object on stdout — its report with the warnings it gave (`"warnings": [...]`),
/// or, when it fails, `{"error": {...}, "warnings": [...]}` — besides the stderr lines.
/// Commands whose JSON is an array shaped like qemu-img's keep warnings and errors on stderr.
enum JSONReport {
    /// Every warning of this run, in order (`warning()` adds them).
    nonisolated(unsafe) static var warnings: [String] = []
    /// The object the command reported, printed by `ExitStatus.run` once the command is done.
    nonisolated(unsafe) static var pending: JSON?

    /// The command's report: printed when the command succeeds, with its warnings.
    static func set(_ value: JSON) {
        guard case .object = value else {
            emit(value.pretty() + "\n")
            return
        }
        pending = value
    }

    /// Prints the pending report (with the warnings) or, after `error`, the error object.
    static func finish(error: Error?) {
        let warningsPair = ("warnings", JSON.array(warnings.map(JSON.string)))
        if let error {
            emit(JSON.object([("error", .object(fields(of: error))), warningsPair]).pretty() + "\n")
        } else if case .object(let pairs) = pending {
            emit(JSON.object(pairs + [warningsPair]).pretty() + "\n")
        }
        pending = nil
    }

    /// message (the same text as the `qbackup: error:` line), code, file, offset and region.
    static func fields(of error: Error) -> [(String, JSON)] {
        let message: String
        var code: String?
        var file: String?
        var offset: UInt64?
        var region: String?
        switch error {
        case let e as QCowError:
            (file, offset, region) = (e.path, e.offset, e.region)
        case let e as BitmapError:
            (file, offset, region) = (e.path, e.offset, e.region)
        case let e as ChainError:
            file = e.path
        default:
            break
        }
        if let coded = error as? CodedError {
            message = coded.description
            // invalidFormat → invalid-format, as the other JSON keys and values are spelled.
            code = coded.errorCode.rawValue.reduce(into: "") { out, c in out += c.isUppercase ? "-" + c.lowercased() : String(c) }
        } else if let cocoa = error as? CocoaError {
            message = ExitStatus.describe(cocoa)
            file = cocoa.filePath ?? cocoa.url?.path
        } else {
            message = "\(error)"
        }
        return [("message", .string(message.replacing("\n", with: " "))),
                ("code", code.map(JSON.string) ?? .null), ("file", file.map(JSON.string) ?? .null),
                ("offset", offset.map(JSON.uint) ?? .null), ("region", region.map(JSON.string) ?? .null)]
    }
}
